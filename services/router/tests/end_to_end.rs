//! Router + cpu-worker end to end, over real gRPC and HTTP connections on
//! loopback, with the bundled ONNX models on ONNX Runtime.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_proto::inference::model_config::SchedulingChoice;
use shamal_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use shamal_proto::inference::*;
use shamal_tensor::{DataType, Tensor, decode_outputs};
use support::*;
use tonic::Code;

fn int32_tensor(name: &str, rows: usize, values: impl Fn(usize) -> i32) -> Tensor {
    let raw: Vec<u8> = (0..rows * 16)
        .flat_map(|i| values(i).to_le_bytes())
        .collect();
    Tensor::from_raw(
        name,
        DataType::Int32,
        vec![rows as i64, 16],
        Bytes::from(raw),
    )
    .unwrap()
}

fn simple_request(rows: usize, version: &str) -> ModelInferRequest {
    let a = int32_tensor("INPUT0", rows, |i| i as i32);
    let b = int32_tensor("INPUT1", rows, |_| 2);
    let (inputs, raw_input_contents) = shamal_tensor::encode_inputs(&[a, b]);
    ModelInferRequest {
        model_name: "simple".into(),
        model_version: version.into(),
        id: "req-1".into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

fn int32_values(tensor: &Tensor) -> Vec<i32> {
    shamal_tensor::to_f64_values(tensor)
        .unwrap()
        .into_iter()
        .map(|v| v as i32)
        .collect()
}

fn outputs(response: ModelInferResponse) -> Vec<Tensor> {
    decode_outputs(response.outputs, response.raw_output_contents).unwrap()
}

fn demo_request(rows: usize, seed: f32) -> ModelInferRequest {
    let raw: Vec<u8> = (0..rows * 16)
        .flat_map(|i| ((i as f32 * 0.37 + seed).sin()).to_le_bytes())
        .collect();
    let input = Tensor::from_raw(
        "INPUT0",
        DataType::Fp32,
        vec![rows as i64, 16],
        Bytes::from(raw),
    )
    .unwrap();
    let (inputs, raw_input_contents) = shamal_tensor::encode_inputs(&[input]);
    ModelInferRequest {
        model_name: "demo".into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

fn f32_values(tensor: &Tensor) -> Vec<f32> {
    shamal_tensor::to_f64_values(tensor)
        .unwrap()
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_config_describe_the_models() {
    let (worker, router) = stack().await;
    let mut client = client(router.running.address).await;

    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "demo".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.platform, "onnxruntime_onnx");
    assert_eq!(metadata.inputs[0].name, "INPUT0");
    assert_eq!(
        metadata.inputs[0].shape,
        vec![-1, 16],
        "batch dimension reported as -1"
    );
    assert_eq!(metadata.outputs[0].shape, vec![-1, 4]);

    let config = client
        .model_config(ModelConfigRequest {
            name: "demo".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 64);
    assert_eq!(config.input[0].dims, vec![16]);
    assert!(matches!(
        config.scheduling_choice,
        Some(SchedulingChoice::DynamicBatching(_))
    ));

    // identity_fp16's configuration turns batching on without a dynamic
    // batcher: dynamic_batching must then be absent.
    let config = client
        .model_config(ModelConfigRequest {
            name: "identity_fp16".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 8);
    assert!(config.scheduling_choice.is_none());

    let server = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(server.extensions.contains(&"binary_tensor_data".to_owned()));
    assert!(
        !server.extensions.contains(&"shared_memory".to_owned()),
        "only implemented extensions"
    );

    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<(String, String)> = index
        .models
        .iter()
        .map(|m| (m.name.clone(), m.version.clone()))
        .collect();
    assert!(
        listed.contains(&("simple".into(), "1".into()))
            && listed.contains(&("simple".into(), "2".into()))
    );
    assert!(
        index.models.iter().all(|model| model.state == "READY"),
        "{index:?}"
    );

    let unimplemented = client
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(unimplemented.code(), Code::Unimplemented);

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_honours_versions_and_requested_outputs() {
    let (worker, router) = stack().await;
    let mut client = client(router.running.address).await;

    let response = client
        .model_infer(simple_request(3, "1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_version, "1");
    assert_eq!(response.id, "req-1");
    let tensors = outputs(response);
    assert_eq!(tensors[0].name, "OUTPUT0");
    assert_eq!(tensors[0].shape, vec![3, 16]);
    assert_eq!(
        int32_values(&tensors[0]),
        (0..48).map(|i| i + 2).collect::<Vec<_>>()
    );
    assert_eq!(
        int32_values(&tensors[1]),
        (0..48).map(|i| i - 2).collect::<Vec<_>>()
    );

    // Version 2 adds one; no version means the highest.
    for version in ["2", ""] {
        let tensors = outputs(
            client
                .model_infer(simple_request(1, version))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(int32_values(&tensors[0])[0], 3, "version {version:?}");
    }

    let mut only_second = simple_request(1, "1");
    only_second.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT1".into(),
        parameters: Default::default(),
    }];
    let tensors = outputs(client.model_infer(only_second).await.unwrap().into_inner());
    assert_eq!(tensors.len(), 1);
    assert_eq!(tensors[0].name, "OUTPUT1");

    // Typed contents work as well as raw contents.
    let typed = ModelInferRequest {
        model_name: "simple".into(),
        model_version: "1".into(),
        inputs: ["INPUT0", "INPUT1"]
            .iter()
            .map(|name| InferInputTensor {
                name: (*name).into(),
                datatype: "INT32".into(),
                shape: vec![1, 16],
                parameters: Default::default(),
                contents: Some(InferTensorContents {
                    int_contents: vec![5; 16],
                    ..Default::default()
                }),
            })
            .collect(),
        ..Default::default()
    };
    let tensors = outputs(client.model_infer(typed).await.unwrap().into_inner());
    assert_eq!(int32_values(&tensors[0]), vec![10; 16]);
    assert_eq!(int32_values(&tensors[1]), vec![0; 16]);

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_keep_faithful_error_codes() {
    let (worker, router) = stack().await;
    let mut client = client(router.running.address).await;

    let mut unknown = simple_request(1, "");
    unknown.model_name = "nope".into();
    let status = client.model_infer(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("nope"));

    let status = client
        .model_infer(simple_request(1, "9"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let mut short = simple_request(1, "");
    short.raw_input_contents[1] = short.raw_input_contents[1].slice(..60);
    let status = client.model_infer(short).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("INPUT1"), "{}", status.message());

    let mut wrong_type = simple_request(1, "");
    wrong_type.inputs[0].datatype = "FP32".into();
    let status = client.model_infer(wrong_type).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("INPUT0") && status.message().contains("INT32"),
        "{}",
        status.message()
    );

    let mut missing = simple_request(1, "");
    missing.inputs.pop();
    missing.raw_input_contents.pop();
    let status = client.model_infer(missing).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("INPUT1"));

    let mut wrong_shape = simple_request(1, "");
    wrong_shape.inputs[0].shape = vec![2, 8];
    let status = client.model_infer(wrong_shape).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("INPUT0"));

    let status = client.model_infer(demo_request(65, 0.0)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("max_batch_size"),
        "{}",
        status.message()
    );

    let mut unknown_output = simple_request(1, "");
    unknown_output.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT9".into(),
        parameters: Default::default(),
    }];
    let status = client.model_infer(unknown_output).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("OUTPUT9"));

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batched_on_the_worker_get_their_own_answers() {
    let (worker, router) = stack().await;
    let mut client = client(router.running.address).await;
    // Sequential answers are the reference.
    let mut reference = Vec::new();
    for seed in 0..24 {
        let response = client
            .model_infer(demo_request(1 + seed % 3, seed as f32))
            .await
            .unwrap();
        reference.push(f32_values(&outputs(response.into_inner())[0]));
    }
    let calls = (0..24).map(|seed| {
        let mut client = client.clone();
        async move {
            client
                .model_infer(demo_request(1 + seed % 3, seed as f32))
                .await
        }
    });
    for (seed, result) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        let got = f32_values(&outputs(result.unwrap().into_inner())[0]);
        assert_eq!(
            got, reference[seed],
            "request {seed} got someone else's rows"
        );
        for row in got.chunks(4) {
            assert!(
                (row.iter().sum::<f32>() - 1.0).abs() < 1e-5,
                "softmax rows sum to one"
            );
        }
    }

    // The INT8-quantised model stays close to the FP32 one.
    let mut quantised = demo_request(2, 1.0);
    quantised.model_name = "demo_int8".into();
    let int8 = f32_values(&outputs(client.model_infer(quantised).await.unwrap().into_inner())[0]);
    let fp32 = f32_values(
        &outputs(
            client
                .model_infer(demo_request(2, 1.0))
                .await
                .unwrap()
                .into_inner(),
        )[0],
    );
    for (a, b) in int8.iter().zip(&fp32) {
        assert!((a - b).abs() < 0.05, "int8 {a} vs fp32 {b}");
    }

    let stats = client
        .model_statistics(ModelStatisticsRequest {
            name: "demo".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let demo = &stats.model_stats[0];
    assert!(demo.inference_count >= 48 + 4, "{demo:?}");
    let inference = demo.inference_stats.as_ref().unwrap();
    let counts = [
        inference.compute_input.as_ref().unwrap().count,
        inference.compute_infer.as_ref().unwrap().count,
        inference.compute_output.as_ref().unwrap().count,
    ];
    assert_eq!(
        counts, [demo.execution_count; 3],
        "perf_analyzer needs equal compute counts"
    );

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_and_binary_inference() {
    let (worker, router) = stack().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", router.http);

    assert_eq!(
        http.get(format!("{base}/v2/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/v2/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/v2/models/demo/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metadata: serde_json::Value = http
        .get(format!("{base}/v2/models/demo"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["inputs"][0]["shape"], serde_json::json!([-1, 16]));
    let response = http
        .get(format!("{base}/v2/models/demo/config"))
        .header("x-request-id", "http-42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-request-id"],
        "http-42",
        "request ids are echoed"
    );
    let config: serde_json::Value = response.json().await.unwrap();
    assert_eq!(config["max_batch_size"], 64);
    assert_eq!(config["input"][0]["data_type"], "TYPE_FP32");

    let json_body = serde_json::json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": (0..16).collect::<Vec<i32>>()},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [vec![1; 16]]}
        ]
    });
    let response: serde_json::Value = http
        .post(format!("{base}/v2/models/simple/versions/1/infer"))
        .json(&json_body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["model_version"], "1");
    assert_eq!(
        response["outputs"][0]["data"],
        serde_json::json!((1..17).collect::<Vec<i32>>())
    );

    // Binary tensor extension: JSON header, then raw bytes, both ways.
    let header = serde_json::json!({
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "parameters": {"binary_data_size": 64}}
        ],
        "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend((0..16).flat_map(|i: i32| (i * 3).to_le_bytes()));
    body.extend((0..16).flat_map(|i: i32| i.to_le_bytes()));
    let response = http
        .post(format!("{base}/v2/models/simple/versions/1/infer"))
        .header("Inference-Header-Content-Length", header.len())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json_length: usize = response.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    let head: serde_json::Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
    assert_eq!(head["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 64);
    let diff: Vec<i32> = bytes[json_length..]
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(diff, (0..16).map(|i| i * 2).collect::<Vec<_>>());

    // Errors: 400 naming the input, 404 for unknown models, never 5xx.
    let bad = serde_json::json!({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1, 2]}]});
    let response = http
        .post(format!("{base}/v2/models/simple/infer"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: serde_json::Value = response.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("INPUT0"),
        "{error}"
    );
    let response = http
        .post(format!("{base}/v2/models/nope/infer"))
        .json(&json_body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = http
        .post(format!("{base}/v2/models/simple/infer"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_model_and_outcome() {
    let (worker, router) = stack().await;
    let mut client = client(router.running.address).await;
    client.model_infer(simple_request(1, "")).await.unwrap();
    let mut unknown = simple_request(1, "");
    unknown.model_name = "nope".into();
    let _ = client.model_infer(unknown).await;
    let text = reqwest::get(format!("http://{}/metrics", router.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"shamal_router_requests_total{code="ok",model="simple",protocol="grpc",version="2"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"code="not_found",model="_unknown""#),
        "unknown model names are not labels"
    );
    assert!(text.contains("shamal_router_request_duration_seconds_bucket"));
    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_unavailable_and_a_live_one_takes_over() {
    let first = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    let second = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    // Both workers serve before the router's one and only refresh.
    wait_ready(first.address, "simple").await;
    wait_ready(second.address, "simple").await;
    let router = start_router(
        vec![first.address.to_string(), second.address.to_string()],
        |config| {
            config.refresh_interval_ms = 60_000;
        },
    )
    .await;
    wait_ready(router.running.address, "simple").await;
    let mut client = client(router.running.address).await;
    first.stop().await.unwrap();
    // With one worker gone, every request still succeeds on the other.
    for _ in 0..10 {
        client.model_infer(simple_request(1, "")).await.unwrap();
    }
    second.stop().await.unwrap();
    let status = client.model_infer(simple_request(1, "")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    router.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_request_ids_reach_the_worker() {
    let (slow, seen) = start_slow_worker(Duration::from_millis(500)).await;
    let router = start_router(vec![slow.to_string()], |_| {}).await;
    wait_ready(router.running.address, "slow").await;
    let mut client = client(router.running.address).await;

    let mut request = tonic::Request::new(ModelInferRequest {
        model_name: "slow".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(100));
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me".parse().unwrap());
    let status = client.model_infer(request).await.unwrap_err();
    // The router answers DEADLINE_EXCEEDED at the deadline; tonic's client
    // may give up on its own timer first and report it as cancelled.
    let client_timer =
        status.code() == Code::Cancelled && status.message().contains("Timeout expired");
    assert!(
        status.code() == Code::DeadlineExceeded || client_timer,
        "{status:?}"
    );

    let seen = seen.lock().unwrap().clone();
    let forwarded = shamal_rpc::parse_grpc_timeout(seen.timeouts[0].as_deref().unwrap()).unwrap();
    assert!(
        forwarded <= Duration::from_millis(100),
        "the worker got the caller's deadline: {forwarded:?}"
    );
    assert_eq!(seen.request_ids[0].as_deref(), Some("trace-me"));

    // Without a client deadline, the router's default applies.
    router.running.stop().await.unwrap();
    let router = start_router(vec![slow.to_string()], |config| {
        config.default_timeout_ms = 50
    })
    .await;
    wait_ready(router.running.address, "slow").await;
    let mut client = support::client(router.running.address).await;
    let status = client
        .model_infer(ModelInferRequest {
            model_name: "slow".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    router.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish_and_overload_is_refused() {
    let (slow, seen) = start_slow_worker(Duration::from_millis(400)).await;
    // Four slots, one of them kept for high-priority requests.
    let mut router = start_router(vec![slow.to_string()], |config| {
        config.max_inflight = 4;
        config.priority_reserve_percent = 25;
    })
    .await;
    wait_ready(router.running.address, "slow").await;
    let client = client(router.running.address).await;
    let request = |priority: Option<u64>| {
        let mut parameters = std::collections::HashMap::new();
        if let Some(priority) = priority {
            parameters.insert(
                "priority".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Uint64Param(priority)),
                },
            );
        }
        ModelInferRequest {
            model_name: "slow".into(),
            parameters,
            ..Default::default()
        }
    };
    let spawn_call = |priority: Option<u64>| {
        let mut client = client.clone();
        let request = request(priority);
        tokio::spawn(async move { client.model_infer(request).await })
    };
    let mut calls: Vec<_> = (0..3).map(|_| spawn_call(None)).collect();
    let wait_at_worker = |count: usize| {
        let seen = seen.clone();
        async move {
            for _ in 0..500 {
                if seen.lock().unwrap().timeouts.len() >= count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{count} requests never reached the worker");
        }
    };
    wait_at_worker(3).await;
    // Three normal requests fill the normal share: the next is refused at once...
    let status = client.clone().model_infer(request(None)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("normal priority"), "{status}");
    // ...and so is a low-priority one, while a high-priority one is admitted.
    let status = client
        .clone()
        .model_infer(request(Some(5)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    calls.push(spawn_call(Some(1)));
    wait_at_worker(4).await;
    // Now the router is full for every priority.
    let status = client
        .clone()
        .model_infer(request(Some(1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // A malformed priority is the caller's error, named.
    let mut bad = request(None);
    bad.parameters.insert(
        "priority".to_owned(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(true)),
        },
    );
    let status = client.clone().model_infer(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("priority"), "{status}");

    router.running.begin_stop();
    for call in calls {
        assert!(
            call.await.unwrap().is_ok(),
            "in-flight requests finish during drain"
        );
    }
    assert_eq!(seen.lock().unwrap().completed, 4);
    router.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_restricted_to_other_regions_is_refused_without_a_registry() {
    // Static workers are in `static_worker_region` ("local" by default).
    let (worker, router) = stack().await;
    let mut client = client(router.running.address).await;
    let mut request = tonic::Request::new(demo_request(1, 0.5));
    request
        .metadata_mut()
        .insert("x-shamal-allowed-regions", "local".parse().unwrap());
    client.model_infer(request).await.unwrap();

    let mut request = tonic::Request::new(demo_request(1, 0.5));
    request
        .metadata_mut()
        .insert("x-shamal-allowed-regions", "eu-west-1".parse().unwrap());
    let status = client.model_infer(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("request allows [eu-west-1]"),
        "{status}"
    );

    // The HTTP twin reads the same header.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v2/models/demo/infer", router.http))
        .header("x-shamal-allowed-regions", "eu-west-1")
        .json(&serde_json::json!({
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                        "data": vec![0.5f32; 16]}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("data residency"),
        "{body}"
    );
    router.running.stop().await.unwrap();
    worker.stop().await.unwrap();
}
