//! Helpers for driving the simulator over real HTTP.
#![allow(dead_code)]

use reqwest::header::HeaderMap;
use serde_json::Value;
use std::time::Duration;
use zdsync_sim::{SimConfig, SimHandle, Simulator, DEFAULT_API_TOKEN};

pub const ADMIN: &str = "admin@acme.test";

pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub enum Auth {
    Basic(String, String),
    Bearer(String),
    None,
}

pub struct T {
    pub sim: SimHandle,
    pub http: reqwest::Client,
    pub base: String,
    pub auth: Auth,
}

pub fn admin_basic() -> Auth {
    Auth::Basic(format!("{ADMIN}/token"), DEFAULT_API_TOKEN.into())
}

impl T {
    pub async fn start(cfg: SimConfig) -> T {
        let sim = Simulator::start(cfg).await.expect("simulator starts");
        let base = sim.base_url();
        T {
            sim,
            http: reqwest::Client::new(),
            base,
            auth: admin_basic(),
        }
    }

    pub async fn new() -> T {
        Self::start(SimConfig::default()).await
    }

    pub fn with_auth(mut self, auth: Auth) -> T {
        self.auth = auth;
        self
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub async fn send_as(
        &self,
        auth: &Auth,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, self.url(path));
        rb = match auth {
            Auth::Basic(u, p) => rb.basic_auth(u, Some(p)),
            Auth::Bearer(t) => rb.bearer_auth(t),
            Auth::None => rb,
        };
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request sent");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body read");
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            json,
        }
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.send_as(&self.auth, method, path, body).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.send("POST", path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.send("PUT", path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        self.send("DELETE", path, None).await
    }

    /// Polls a job until it is terminal (bounded).
    pub async fn wait_job(&self, job_status: &Value) -> Value {
        let url = job_status["url"].as_str().expect("job url").to_string();
        for _ in 0..500 {
            let r = self.get(&url).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let js = r.json["job_status"].clone();
            if matches!(
                js["status"].as_str(),
                Some("completed" | "failed" | "killed")
            ) {
                return js;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("job never finished: {job_status}");
    }

    /// Posts a bulk request and waits for its job.
    pub async fn run_job(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self.send(method, path, body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["job_status"]["status"], "queued");
        self.wait_job(&r.json["job_status"]).await
    }
}
