//! `zdsync-bench timestamps`: the date-time parser on the texts warehouses write by default,
//! against chrono's `parse_from_str` reading the same texts with one fixed format (a reference
//! that knows the format in advance, measured in the same run).

use std::hint::black_box;
use std::time::Instant;

/// Snowflake TIMESTAMP_TZ text with an offset (one of four), the commonest hard case.
fn texts(n: usize) -> Vec<String> {
    const OFFSETS: [&str; 4] = ["-0800", "+0530", "+0000", "-0330"];
    (0..n)
        .map(|i| {
            format!(
                "20{:02}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} {}",
                10 + i % 15,
                1 + i % 12,
                1 + i % 28,
                i % 24,
                i % 60,
                (i * 7) % 60,
                i % 1000,
                OFFSETS[i % 4]
            )
        })
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn bench_timestamps(values: usize, rounds: usize) {
    let input = texts(values);
    // Both sides must agree on every value before anything is timed.
    for s in &input {
        let ours = zdsync::mapping::datetime_utc(s).expect("parses");
        let reference = chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.3f %z")
            .expect("chrono parses")
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        assert_eq!(std::str::from_utf8(&ours).unwrap(), reference, "{s}");
    }
    let (mut ours_best, mut chrono_best) = (f64::MAX, f64::MAX);
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        for s in &input {
            black_box(zdsync::mapping::datetime_utc(black_box(s)));
        }
        ours_best = ours_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for s in &input {
            let dt = chrono::DateTime::parse_from_str(black_box(s), "%Y-%m-%d %H:%M:%S%.3f %z");
            black_box(dt.map(|d| d.with_timezone(&chrono::Utc)).ok());
        }
        chrono_best = chrono_best.min(t.elapsed().as_secs_f64());
    }
    let ns = |s: f64| s * 1e9 / values as f64;
    println!(
        "timestamps bench: {values} Snowflake TIMESTAMP_TZ texts (`2024-03-10 23:30:00.000 -0800`), min of {rounds} rounds, load average {}",
        loadavg()
    );
    println!(
        "zdsync datetime_utc        {:>7.1} ns/value (every value equal to chrono's UTC text)",
        ns(ours_best)
    );
    println!(
        "chrono parse_from_str      {:>7.1} ns/value (one fixed format, to UTC, no output text)",
        ns(chrono_best)
    );
    println!(
        "ratio zdsync / chrono      {:>7.2}",
        ours_best / chrono_best
    );
}
