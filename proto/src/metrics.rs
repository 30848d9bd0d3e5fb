//! Prometheus metrics: the text exposition format (0.0.4), and the small HTTP endpoint that
//! serves it (`GET /metrics`) for the controller and every node agent.

use std::fmt::Write;
use std::future::Future;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A metric family: one name, one type, its samples.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    /// counter, gauge or histogram
    pub kind: &'static str,
    pub samples: Vec<Sample>,
}

/// One sample: labels and value. Histogram samples carry their own suffix.
pub struct Sample {
    pub suffix: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

impl Family {
    pub fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample; returns self for chaining.
    pub fn with(mut self, labels: &[(&'static str, &str)], value: f64) -> Family {
        self.samples.push(Sample {
            suffix: "",
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        });
        self
    }
}

/// A histogram with fixed buckets (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn family(&self, name: &'static str, help: &'static str) -> Family {
        let mut family = Family::new(name, "histogram", help);
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            family.samples.push(Sample {
                suffix: "_bucket",
                labels: vec![("le", format_value(*bound))],
                value: *count as f64,
            });
        }
        family.samples.push(Sample {
            suffix: "_bucket",
            labels: vec![("le", "+Inf".into())],
            value: self.count as f64,
        });
        family.samples.push(Sample {
            suffix: "_sum",
            labels: vec![],
            value: self.sum,
        });
        family.samples.push(Sample {
            suffix: "_count",
            labels: vec![],
            value: self.count as f64,
        });
        family
    }
}

/// The text format.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for s in &f.samples {
            out.push_str(f.name);
            out.push_str(s.suffix);
            if !s.labels.is_empty() {
                out.push('{');
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                out.push_str(&labels.join(","));
                out.push('}');
            }
            let _ = writeln!(out, " {}", format_value(s.value));
        }
    }
    out
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` (and `GET /healthz`) on `listener` until the task is dropped.
/// Each scrape calls `scrape` for the current text.
pub async fn serve<F, Fut>(listener: TcpListener, scrape: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut read = 0;
            // The request line and headers; a scrape has no body.
            while read < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[read..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => read += n,
                }
                if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let request = String::from_utf8_lossy(&buf[..read]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let method = request.split_whitespace().next().unwrap_or("");
            let (status, content_type, body) = match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    scrape().await,
                ),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain",
                    "not found: try /metrics\n".to_string(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET\n".to_string(),
                ),
            };
            let response = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let mut h = Histogram::new(&[0.001, 0.01]);
        h.observe(0.005);
        let text = render(&[
            Family::new("muster_tasks", "gauge", "Tasks by state.")
                .with(&[("state", "running")], 3.0),
            h.family("muster_inbox_append_seconds", "Inbox append latency."),
        ]);

        assert!(
            text.contains("# TYPE muster_tasks gauge\nmuster_tasks{state=\"running\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("muster_inbox_append_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("muster_inbox_append_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("muster_inbox_append_seconds_count 1\n"),
            "{text}"
        );
    }
}
