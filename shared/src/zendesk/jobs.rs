//! Job statuses as Zendesk returns them (`{"job_status": {...}}`, `{"job_statuses": [...]}`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    #[serde(default)]
    pub url: Option<String>,
    pub status: String,
    #[serde(default)]
    pub total: Option<u64>,
    #[serde(default)]
    pub progress: Option<u64>,
    #[serde(default)]
    pub message: Option<String>,
    /// An array of per-item results (an object form exists for other job kinds; it is ignored).
    #[serde(default, deserialize_with = "results_list")]
    pub results: Vec<JobResult>,
}

impl JobStatus {
    /// `completed`, `failed` and `killed` are final; `queued` and `working` are not.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "killed")
    }
}

/// One item of a job's results. Zendesk's shapes differ per endpoint, so every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub success: Option<bool>,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub details: Option<serde_json::Value>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub external_id: Option<String>,
}

impl JobResult {
    /// Whether the item failed: `success: false`, `status: "Failed"`, or an `error` code.
    pub fn failed(&self) -> bool {
        self.success == Some(false)
            || self.status.as_deref() == Some("Failed")
            || (self.error.is_some() && self.success != Some(true))
    }

    /// `error: details` as one line for a failed row.
    pub fn reason(&self) -> String {
        let details = match &self.details {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        match (&self.error, details.is_empty()) {
            (Some(e), false) => format!("{e}: {details}"),
            (Some(e), true) => e.clone(),
            (None, false) => details,
            (None, true) => "the job reported this item as failed without a reason".to_string(),
        }
    }
}

fn results_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<JobResult>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|i| serde_json::from_value(i).unwrap_or_default())
            .collect(),
        _ => Vec::new(),
    })
}
