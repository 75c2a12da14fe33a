//! Zendesk Support simulator (filled in by the simulator work).
