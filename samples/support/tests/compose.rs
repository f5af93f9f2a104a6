//! docker-compose.yml, which users run the samples against: it parses, and has
//! the services, ports, health checks and settings the samples and the README
//! rely on.

#![allow(clippy::unwrap_used)]

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docker-compose.yml");
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text)
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
}

fn ports(service: &Yaml) -> Vec<String> {
    service["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

fn env(service: &Yaml, name: &str) -> String {
    let value = &service["environment"][name];
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn compose_file_has_the_services_ports_and_health_checks_the_samples_need() {
    let compose = compose();
    let services = &compose["services"];
    let expected = [
        ("kafka", vec!["9092:9092"]),
        ("rabbitmq", vec!["5672:5672", "15672:15672"]),
        ("postgres", vec!["5432:5432"]),
        ("jaeger", vec!["16686:16686", "4317:4317", "4318:4318"]),
    ];
    for (name, wanted) in expected {
        let service = &services[name];
        assert!(!service.is_badvalue(), "service {name} missing");
        assert!(service["image"].as_str().is_some(), "{name} has no image");
        let published = ports(service);
        for port in wanted {
            assert!(
                published.iter().any(|p| p == port),
                "{name} does not publish {port}: {published:?}"
            );
        }
        assert!(
            service["healthcheck"]["test"]
                .as_vec()
                .is_some_and(|t| !t.is_empty()),
            "{name} has no health check"
        );
    }

    let kafka = &services["kafka"];
    assert!(kafka["image"].as_str().unwrap().starts_with("apache/kafka"));
    assert!(
        env(kafka, "KAFKA_PROCESS_ROLES").contains("controller"),
        "KRaft mode"
    );
    assert!(env(kafka, "KAFKA_ADVERTISED_LISTENERS").contains("127.0.0.1:9092"));
    assert_eq!(
        env(kafka, "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"),
        "1",
        "single node"
    );

    assert!(
        services["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management")
    );
    assert_eq!(
        env(&services["postgres"], "POSTGRES_HOST_AUTH_METHOD"),
        "trust"
    );
    assert_eq!(env(&services["jaeger"], "COLLECTOR_OTLP_ENABLED"), "true");
}
