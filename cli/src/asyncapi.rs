//! `brighter asyncapi`: a service's AsyncAPI document, from the URL it
//! serves it at or from a file, summarized.

use serde_json::Value;

use crate::Res;
use crate::report::Report;

async fn fetch(source: &str) -> Res<Value> {
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        let response = reqwest::get(source)
            .await
            .map_err(|e| format!("fetch {source}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("fetch {source}: {}", response.status()).into());
        }
        response
            .text()
            .await
            .map_err(|e| format!("fetch {source}: {e}"))?
    } else {
        std::fs::read_to_string(source).map_err(|e| format!("read {source}: {e}"))?
    };
    serde_json::from_str(&text)
        .map_err(|e| format!("{source} is not a JSON AsyncAPI document: {e}").into())
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// The name of what a `$ref` points at (its last path part).
fn target(value: &Value) -> String {
    value["$ref"]
        .as_str()
        .and_then(|r| r.rsplit('/').next())
        .unwrap_or_default()
        .to_owned()
}

pub(crate) async fn run(source: &str) -> Res<Report> {
    let document = fetch(source).await?;
    if document["asyncapi"]
        .as_str()
        .is_none_or(|v| !v.starts_with('3'))
    {
        return Err(format!("{source} is not an AsyncAPI 3 document").into());
    }
    let empty = serde_json::Map::new();
    let object = |key: &str| document[key].as_object().unwrap_or(&empty).clone();
    let servers: Vec<Vec<String>> = object("servers")
        .iter()
        .map(|(name, s)| {
            vec![
                name.clone(),
                text(&s["protocol"]),
                text(&s["host"]),
                text(&s["pathname"]),
            ]
        })
        .collect();
    let channels = object("channels");
    let operations: Vec<Vec<String>> = object("operations")
        .iter()
        .map(|(name, o)| {
            let channel = target(&o["channel"]);
            let address = channels
                .get(&channel)
                .and_then(|c| c["address"].as_str())
                .unwrap_or("(dynamic)")
                .to_owned();
            let messages = o["messages"]
                .as_array()
                .map(|m| m.iter().map(target).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let reply = o["reply"]["messages"]
                .as_array()
                .map(|m| m.iter().map(target).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            vec![text(&o["action"]), messages, address, reply, name.clone()]
        })
        .collect();
    let info = &document["info"];
    Ok(Report::line(
        format!(
            "{} {} (AsyncAPI {}): {} server(s), {} channel(s), {} operation(s)",
            text(&info["title"]),
            text(&info["version"]),
            text(&document["asyncapi"]),
            servers.len(),
            channels.len(),
            operations.len()
        ),
        document.clone(),
    )
    .table("servers", &["name", "protocol", "host", "path"], servers)
    .table(
        "operations",
        &["action", "messages", "address", "reply", "operation"],
        operations,
    ))
}
