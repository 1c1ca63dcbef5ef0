//! KServe v2 HTTP/JSON bodies to and from the gRPC messages, including
//! Triton's binary tensor data extension (`Inference-Header-Content-Length`:
//! a JSON header followed by raw tensor bytes).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use shamal_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};
use shamal_tensor::{
    DataType, Tensor, TensorData, decode_outputs, float_bytes_from_f64, to_f64_values,
};

/// The binary data extension's header: the length of the JSON header that
/// precedes the raw tensor bytes (of a request or a response).
pub(crate) const HEADER_LENGTH: &str = "inference-header-content-length";

/// A request the client must fix: HTTP 400 with this message.
#[derive(Debug)]
pub struct BadRequest(pub String);

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest(message.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// Which outputs to return as binary data.
#[derive(Debug)]
pub struct OutputEncoding {
    default_binary: bool,
    binary: HashMap<String, bool>,
}

impl OutputEncoding {
    /// Every output as JSON data (`false`) or every output as binary data.
    pub fn uniform(binary: bool) -> OutputEncoding {
        OutputEncoding {
            default_binary: binary,
            binary: HashMap::new(),
        }
    }

    fn binary(&self, name: &str) -> bool {
        self.binary
            .get(name)
            .copied()
            .unwrap_or(self.default_binary)
    }
}

fn json_parameter(value: &Value) -> Option<InferParameter> {
    let choice = match value {
        Value::Bool(flag) => ParameterChoice::BoolParam(*flag),
        Value::String(text) => ParameterChoice::StringParam(text.clone()),
        Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                ParameterChoice::Int64Param(integer)
            } else if let Some(unsigned) = number.as_u64() {
                ParameterChoice::Uint64Param(unsigned)
            } else {
                ParameterChoice::DoubleParam(number.as_f64()?)
            }
        }
        _ => return None,
    };
    Some(InferParameter {
        parameter_choice: Some(choice),
    })
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

/// Converts JSON `data` to a validated tensor (so errors name the input).
fn json_tensor(
    name: &str,
    datatype: DataType,
    shape: Vec<i64>,
    data: &Value,
) -> Result<Tensor, BadRequest> {
    let mut values = Vec::new();
    flatten(data, &mut values);
    let wrong = |what: &str| bad(format!("input '{name}': {datatype} data must be {what}"));
    let mut contents = InferTensorContents::default();
    match datatype {
        DataType::Bool => {
            contents.bool_contents = values
                .iter()
                .map(|value| value.as_bool().ok_or_else(|| wrong("true or false")))
                .collect::<Result<_, _>>()?;
        }
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            contents.int_contents = values
                .iter()
                .map(|value| {
                    value
                        .as_i64()
                        .and_then(|integer| i32::try_from(integer).ok())
                        .ok_or_else(|| wrong("integers in range"))
                })
                .collect::<Result<_, _>>()?;
        }
        DataType::Int64 => {
            contents.int64_contents = values
                .iter()
                .map(|value| value.as_i64().ok_or_else(|| wrong("integers")))
                .collect::<Result<_, _>>()?;
        }
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => {
            contents.uint_contents = values
                .iter()
                .map(|value| {
                    value
                        .as_u64()
                        .and_then(|integer| u32::try_from(integer).ok())
                        .ok_or_else(|| wrong("non-negative integers in range"))
                })
                .collect::<Result<_, _>>()?;
        }
        DataType::Uint64 => {
            contents.uint64_contents = values
                .iter()
                .map(|value| value.as_u64().ok_or_else(|| wrong("non-negative integers")))
                .collect::<Result<_, _>>()?;
        }
        DataType::Fp32 => {
            contents.fp32_contents = values
                .iter()
                .map(|value| {
                    value
                        .as_f64()
                        .map(|number| number as f32)
                        .ok_or_else(|| wrong("numbers"))
                })
                .collect::<Result<_, _>>()?;
        }
        DataType::Fp64 => {
            contents.fp64_contents = values
                .iter()
                .map(|value| value.as_f64().ok_or_else(|| wrong("numbers")))
                .collect::<Result<_, _>>()?;
        }
        DataType::Fp16 | DataType::Bf16 => {
            let numbers = values
                .iter()
                .map(|value| value.as_f64().ok_or_else(|| wrong("numbers")))
                .collect::<Result<Vec<f64>, _>>()?;
            let raw = float_bytes_from_f64(datatype, &numbers).unwrap_or_default();
            return Tensor::from_raw(name, datatype, shape, raw)
                .map_err(|error| bad(error.to_string()));
        }
        DataType::Bytes => {
            contents.bytes_contents = values
                .iter()
                .map(|value| {
                    value
                        .as_str()
                        .map(|text| Bytes::copy_from_slice(text.as_bytes()))
                        .ok_or_else(|| wrong("strings"))
                })
                .collect::<Result<_, _>>()?;
        }
    }
    Tensor::from_contents(name, datatype, shape, &contents).map_err(|error| bad(error.to_string()))
}

fn binary_size(
    parameters: &Option<Map<String, Value>>,
    name: &str,
) -> Result<Option<usize>, BadRequest> {
    match parameters
        .as_ref()
        .and_then(|parameters| parameters.get("binary_data_size"))
    {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .and_then(|size| usize::try_from(size).ok())
            .map(Some)
            .ok_or_else(|| {
                bad(format!(
                    "input '{name}': binary_data_size must be a non-negative integer"
                ))
            }),
    }
}

/// Parses an HTTP infer body into a gRPC request (all inputs as raw
/// contents) and the requested output encoding.
pub fn parse_infer_request(
    model: &str,
    version: &str,
    body: Bytes,
    header_length: Option<usize>,
) -> Result<(ModelInferRequest, OutputEncoding), BadRequest> {
    let (header, mut binary) = match header_length {
        Some(length) if length > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length {length} exceeds the body's {} bytes",
                body.len()
            )));
        }
        Some(length) => {
            let mut body = body;
            let header = body.split_to(length);
            (header, body)
        }
        None => (body, Bytes::new()),
    };
    let request: JsonRequest = serde_json::from_slice(&header)
        .map_err(|error| bad(format!("invalid inference request JSON: {error}")))?;

    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            bad(format!(
                "input '{}': unknown datatype '{}'",
                input.name, input.datatype
            ))
        })?;
        let tensor = match (binary_size(&input.parameters, &input.name)?, &input.data) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input '{}': give either data or binary_data_size, not both",
                    input.name
                )));
            }
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(bad(format!(
                        "input '{}': binary_data_size {size} exceeds the {} binary bytes left",
                        input.name,
                        binary.len()
                    )));
                }
                let bytes = binary.split_to(size);
                Tensor::from_raw(input.name.clone(), datatype, input.shape.clone(), bytes)
                    .map_err(|error| bad(error.to_string()))?
            }
            (None, Some(data)) => json_tensor(&input.name, datatype, input.shape.clone(), data)?,
            (None, None) => return Err(bad(format!("input '{}': no data", input.name))),
        };
        let parameters = input
            .parameters
            .iter()
            .flatten()
            .filter(|(key, _)| key.as_str() != "binary_data_size")
            .filter_map(|(key, value)| Some((key.clone(), json_parameter(value)?)))
            .collect();
        raw.push(tensor.to_raw());
        inputs.push(InferInputTensor {
            name: tensor.name,
            datatype: tensor.datatype.as_str().to_owned(),
            shape: tensor.shape,
            parameters,
            contents: None,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are not claimed by any input",
            binary.len()
        )));
    }

    let mut encoding = OutputEncoding {
        default_binary: false,
        binary: HashMap::new(),
    };
    let mut parameters = HashMap::new();
    for (key, value) in request.parameters.iter().flatten() {
        if key == "binary_data_output" {
            encoding.default_binary = value
                .as_bool()
                .ok_or_else(|| bad("parameter binary_data_output must be true or false"))?;
        } else if let Some(parameter) = json_parameter(value) {
            parameters.insert(key.clone(), parameter);
        }
    }
    let mut outputs = Vec::new();
    for output in request.outputs.into_iter().flatten() {
        if let Some(flag) = output
            .parameters
            .as_ref()
            .and_then(|parameters| parameters.get("binary_data"))
        {
            let flag = flag.as_bool().ok_or_else(|| {
                bad(format!(
                    "output '{}': binary_data must be true or false",
                    output.name
                ))
            })?;
            encoding.binary.insert(output.name.clone(), flag);
        }
        outputs.push(InferRequestedOutputTensor {
            name: output.name,
            parameters: Default::default(),
        });
    }
    Ok((
        ModelInferRequest {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            id: request.id.unwrap_or_default(),
            parameters,
            inputs,
            outputs,
            raw_input_contents: raw,
        },
        encoding,
    ))
}

fn json_data(tensor: &Tensor) -> Value {
    match &tensor.data {
        TensorData::Strings(items) => Value::Array(
            items
                .iter()
                .map(|item| Value::String(String::from_utf8_lossy(item).into_owned()))
                .collect(),
        ),
        // 64-bit integers are read exactly, not through f64.
        TensorData::Fixed(bytes) if tensor.datatype == DataType::Int64 => Value::Array(
            bytes
                .chunks_exact(8)
                .map(|chunk| json!(i64::from_le_bytes(chunk.try_into().unwrap_or_default())))
                .collect(),
        ),
        TensorData::Fixed(bytes) if tensor.datatype == DataType::Uint64 => Value::Array(
            bytes
                .chunks_exact(8)
                .map(|chunk| json!(u64::from_le_bytes(chunk.try_into().unwrap_or_default())))
                .collect(),
        ),
        TensorData::Fixed(_) => {
            let numbers = to_f64_values(tensor).unwrap_or_default();
            let as_integer = !matches!(
                tensor.datatype,
                DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64
            );
            Value::Array(
                numbers
                    .into_iter()
                    .map(|number| match tensor.datatype {
                        DataType::Bool => Value::Bool(number != 0.0),
                        _ if as_integer => json!(number as i64),
                        _ => json!(number),
                    })
                    .collect(),
            )
        }
    }
}

/// Renders a gRPC response as an HTTP body: JSON alone, or a JSON header
/// followed by binary outputs. Returns the body and the header length when
/// binary data follows.
pub fn render_infer_response(
    response: ModelInferResponse,
    encoding: &OutputEncoding,
) -> Result<(Vec<u8>, Option<usize>), String> {
    let tensors = decode_outputs(response.outputs, response.raw_output_contents)
        .map_err(|error| error.to_string())?;
    let mut binary = BytesMut::new();
    let mut outputs = Vec::with_capacity(tensors.len());
    for tensor in &tensors {
        let mut output = json!({
            "name": tensor.name,
            "datatype": tensor.datatype.as_str(),
            "shape": tensor.shape,
        });
        if encoding.binary(&tensor.name) {
            let raw = tensor.to_raw();
            output["parameters"] = json!({ "binary_data_size": raw.len() });
            binary.extend_from_slice(&raw);
        } else {
            output["data"] = json_data(tensor);
        }
        outputs.push(output);
    }
    let mut body = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    });
    if !response.id.is_empty() {
        body["id"] = Value::String(response.id);
    }
    let mut header = serde_json::to_vec(&body).map_err(|error| error.to_string())?;
    if binary.is_empty() {
        return Ok((header, None));
    }
    let header_length = header.len();
    header.extend_from_slice(&binary);
    Ok((header, Some(header_length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_inputs_become_raw_contents() {
        let body = br#"{"id":"7","inputs":[
            {"name":"A","shape":[1,2],"datatype":"INT32","data":[[1,-2]]},
            {"name":"B","shape":[2],"datatype":"FP16","data":[0.5,2]},
            {"name":"C","shape":[1],"datatype":"BYTES","data":["hi"]}],
            "outputs":[{"name":"X","parameters":{"binary_data":true}}],
            "parameters":{"binary_data_output":false,"priority":2}}"#;
        let (request, encoding) =
            parse_infer_request("m", "", Bytes::from_static(body), None).unwrap();
        assert_eq!(request.id, "7");
        assert_eq!(
            request.raw_input_contents[0].as_ref(),
            [1, 0, 0, 0, 254, 255, 255, 255]
        );
        assert_eq!(
            request.raw_input_contents[1].as_ref(),
            [0x00, 0x38, 0x00, 0x40]
        );
        assert_eq!(
            request.raw_input_contents[2].as_ref(),
            [2, 0, 0, 0, b'h', b'i']
        );
        assert!(encoding.binary("X"));
        assert!(!encoding.binary("Y"));
        assert!(request.parameters.contains_key("priority"));
        assert!(!request.parameters.contains_key("binary_data_output"));
    }

    #[test]
    fn binary_inputs_are_taken_in_order() {
        let header = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}},{"name":"B","shape":[1],"datatype":"UINT8","parameters":{"binary_data_size":1}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&[1, 2, 3]);
        let (request, _) =
            parse_infer_request("m", "1", Bytes::from(body.clone()), Some(header.len())).unwrap();
        assert_eq!(
            request.raw_input_contents,
            vec![Bytes::from_static(&[1, 2]), Bytes::from_static(&[3])]
        );
        assert_eq!(request.model_version, "1");

        body.push(9);
        let error =
            parse_infer_request("m", "", Bytes::from(body), Some(header.len())).unwrap_err();
        assert!(error.0.contains("not claimed"), "{}", error.0);
    }

    #[test]
    fn malformed_bodies_are_refused_naming_the_problem() {
        let cases: [(&[u8], Option<usize>, &str); 7] = [
            (b"{", None, "invalid inference request JSON"),
            (br#"{"inputs":[{"name":"A","shape":[2],"datatype":"INT8","data":[1,300]}]}"#, None, "'A'"),
            (br#"{"inputs":[{"name":"A","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, None, "'A'"),
            (br#"{"inputs":[{"name":"A","shape":[1],"datatype":"NOPE","data":[1]}]}"#, None, "unknown datatype"),
            (br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32"}]}"#, None, "no data"),
            (br#"{"inputs":[{"name":"A","shape":[4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}"#, None, "exceeds"),
            (b"{}", Some(99), "exceeds"),
        ];
        for (body, header_length, expected) in cases {
            let error =
                parse_infer_request("m", "", Bytes::from_static(body), header_length).unwrap_err();
            assert!(
                error.0.contains(expected),
                "{}: {}",
                String::from_utf8_lossy(body),
                error.0
            );
        }
    }

    #[test]
    fn sixty_four_bit_integers_render_exactly() {
        let big = u64::MAX - 1;
        let tensor = Tensor::from_raw(
            "U",
            DataType::Uint64,
            vec![1],
            Bytes::copy_from_slice(&big.to_le_bytes()),
        )
        .unwrap();
        assert_eq!(json_data(&tensor), json!([big]));
        let odd = (1i64 << 53) + 1;
        let tensor = Tensor::from_raw(
            "I",
            DataType::Int64,
            vec![1],
            Bytes::copy_from_slice(&odd.to_le_bytes()),
        )
        .unwrap();
        assert_eq!(json_data(&tensor), json!([odd]));
    }

    #[test]
    fn responses_render_as_json_or_binary() {
        let tensor = Tensor::from_raw(
            "X",
            DataType::Int32,
            vec![2],
            Bytes::from_static(&[1, 0, 0, 0, 2, 0, 0, 0]),
        )
        .unwrap();
        let (outputs, raw) = shamal_tensor::encode_outputs(&[tensor]);
        let response = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            outputs,
            raw_output_contents: raw,
            ..Default::default()
        };
        let json_only = OutputEncoding {
            default_binary: false,
            binary: HashMap::new(),
        };
        let (body, header) = render_infer_response(response.clone(), &json_only).unwrap();
        assert_eq!(header, None);
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["outputs"][0]["data"], json!([1, 2]));

        let binary = OutputEncoding {
            default_binary: true,
            binary: HashMap::new(),
        };
        let (body, header) = render_infer_response(response, &binary).unwrap();
        let header = header.unwrap();
        let value: Value = serde_json::from_slice(&body[..header]).unwrap();
        assert_eq!(
            value["outputs"][0]["parameters"]["binary_data_size"],
            json!(8)
        );
        assert_eq!(&body[header..], &[1, 0, 0, 0, 2, 0, 0, 0]);
    }
}
