//! ONNX Runtime backend (through `ort`, loading libonnxruntime dynamically).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime, TensorSpec};

#[cfg(target_endian = "big")]
compile_error!(
    "the ONNX Runtime backend moves tensor bytes as little-endian and needs a little-endian target"
);

/// Graph optimisation level, as operators name it in configuration.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Optimization {
    Disable,
    Basic,
    Extended,
    All,
}

impl Optimization {
    fn level(self) -> GraphOptimizationLevel {
        match self {
            Optimization::Disable => GraphOptimizationLevel::Disable,
            Optimization::Basic => GraphOptimizationLevel::Level1,
            Optimization::Extended => GraphOptimizationLevel::Level2,
            Optimization::All => GraphOptimizationLevel::Level3,
        }
    }

    fn parse(text: &str) -> Option<Optimization> {
        match text {
            "disable" => Some(Optimization::Disable),
            "basic" => Some(Optimization::Basic),
            "extended" => Some(Optimization::Extended),
            "all" => Some(Optimization::All),
            _ => None,
        }
    }
}

/// Session options shared by every model of the worker; a model's
/// `config.pbtxt` parameters `intra_op_thread_count` and
/// `graph_optimization_level` override them per model.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub intra_threads: usize,
    pub optimization: Optimization,
}

/// Why ONNX Runtime cannot be set up. The outcome of the first attempt is
/// kept for the process (see [`OnnxRuntime::new`]), hence `Clone` and the
/// shared sources.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// libonnxruntime cannot be loaded (missing, wrong version).
    #[error("cannot load ONNX Runtime from {}: {source}", library.display())]
    Load {
        library: PathBuf,
        source: Arc<ort::LoadDynamicError>,
    },
    /// The library loaded but refuses to create its environment.
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(#[source] Arc<ort::Error>),
}

/// The ONNX Runtime model runtime.
pub struct OnnxRuntime {
    environment: ort::environment::Environment,
    options: SessionOptions,
}

fn internal(error: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(error.to_string())
}

impl OnnxRuntime {
    /// Loads libonnxruntime from `library` and creates the environment.
    /// ONNX Runtime allows one environment (and one library) per process:
    /// the first call decides, later ones share it (its failure too).
    pub fn new(library: &Path, options: SessionOptions) -> Result<OnnxRuntime, Error> {
        static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, Error>> =
            OnceLock::new();
        let environment = ENVIRONMENT
            .get_or_init(|| {
                let builder = ort::init_from(library).map_err(|source| Error::Load {
                    library: library.to_owned(),
                    source: Arc::new(source),
                })?;
                builder
                    .with_name("shamal")
                    .with_telemetry(false)
                    .build()
                    .map_err(|source| Error::Environment(Arc::new(source)))
            })
            .clone()?;
        Ok(OnnxRuntime {
            environment,
            options,
        })
    }

    fn session(
        &self,
        model_file: &Path,
        options: &InstanceOptions,
    ) -> Result<Session, BackendError> {
        let mut intra_threads = self.options.intra_threads;
        let mut optimization = self.options.optimization;
        if let Some(value) = options.parameters.get("intra_op_thread_count") {
            intra_threads = value
                .parse()
                .ok()
                .filter(|threads| *threads > 0)
                .ok_or_else(|| {
                    BackendError::InvalidInput(format!(
                        "intra_op_thread_count '{value}' is not a positive number"
                    ))
                })?;
        }
        if let Some(value) = options.parameters.get("graph_optimization_level") {
            optimization = Optimization::parse(value).ok_or_else(|| {
                BackendError::InvalidInput(format!(
                    "graph_optimization_level '{value}' is not one of disable, basic, extended, all"
                ))
            })?;
        }
        Session::builder(&self.environment)
            .map_err(internal)?
            .with_optimization_level(optimization.level())
            .map_err(internal)?
            .with_intra_threads(intra_threads)
            .map_err(internal)?
            // Requests are served by several instances on their own threads;
            // spinning idle ORT threads would steal their CPU.
            .with_intra_op_spinning(false)
            .map_err(internal)?
            .commit_from_file(model_file)
            .map_err(internal)
    }
}

fn datatype_of(element: TensorElementType) -> Option<DataType> {
    Some(match element {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn spec_of(name: &str, value_type: &ValueType) -> Result<TensorSpec, BackendError> {
    let ValueType::Tensor { ty, shape, .. } = value_type else {
        return Err(BackendError::InvalidInput(format!(
            "'{name}' is not a tensor; only tensor inputs and outputs are served"
        )));
    };
    let datatype = datatype_of(*ty).ok_or_else(|| {
        BackendError::InvalidInput(format!(
            "'{name}' has element type {ty:?}, which the v2 protocol cannot carry"
        ))
    })?;
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype,
        dims: shape
            .iter()
            .map(|&dim| if dim < 0 { -1 } else { dim })
            .collect(),
    })
}

impl Runtime for OnnxRuntime {
    fn platform(&self) -> &'static str {
        "onnxruntime_onnx"
    }

    fn backend(&self) -> &'static str {
        "onnxruntime"
    }

    fn model_filename(&self) -> &'static str {
        "model.onnx"
    }

    fn formats(&self) -> &'static [&'static str] {
        &["onnx"]
    }

    fn signature(&self, model_file: &Path) -> Result<ModelSignature, BackendError> {
        let options = InstanceOptions::default();
        let session = self.session(model_file, &options)?;
        let inputs = session
            .inputs()
            .iter()
            .map(|outlet| spec_of(outlet.name(), outlet.dtype()))
            .collect::<Result<_, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|outlet| spec_of(outlet.name(), outlet.dtype()))
            .collect::<Result<_, _>>()?;
        Ok(ModelSignature { inputs, outputs })
    }

    fn instantiate(
        &self,
        model_file: &Path,
        options: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError> {
        let session = self.session(model_file, options)?;
        let output_names = session
            .outputs()
            .iter()
            .map(|outlet| outlet.name().to_owned())
            .collect();
        Ok(Box::new(OnnxBackend {
            session,
            output_names,
        }))
    }
}

/// One ONNX Runtime session.
pub struct OnnxBackend {
    session: Session,
    output_names: Vec<String>,
}

macro_rules! pod_tensor {
    ($ty:ty, $shape:expr, $bytes:expr) => {{
        let values: Vec<$ty> = bytemuck::pod_collect_to_vec::<u8, $ty>($bytes);
        OrtTensor::from_array(($shape, values)).map(|tensor| tensor.into_dyn())
    }};
}

fn to_ort(tensor: &Tensor) -> Result<DynValue, BackendError> {
    let shape = tensor.shape.clone();
    let bytes: &[u8] = match &tensor.data {
        TensorData::Fixed(bytes) => bytes,
        TensorData::Strings(items) => {
            let strings = items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    String::from_utf8(item.to_vec()).map_err(|_| {
                        BackendError::InvalidInput(format!(
                            "input '{}': element {index} is not valid UTF-8, which ONNX string tensors require",
                            tensor.name
                        ))
                    })
                })
                .collect::<Result<Vec<String>, _>>()?;
            return OrtTensor::from_string_array((shape, strings.as_slice()))
                .map(|tensor| tensor.into_dyn())
                .map_err(internal);
        }
    };
    let value = match tensor.datatype {
        DataType::Bool => {
            let values: Vec<bool> = bytes.iter().map(|&byte| byte != 0).collect();
            OrtTensor::from_array((shape, values)).map(|tensor| tensor.into_dyn())
        }
        DataType::Uint8 => pod_tensor!(u8, shape, bytes),
        DataType::Uint16 => pod_tensor!(u16, shape, bytes),
        DataType::Uint32 => pod_tensor!(u32, shape, bytes),
        DataType::Uint64 => pod_tensor!(u64, shape, bytes),
        DataType::Int8 => pod_tensor!(i8, shape, bytes),
        DataType::Int16 => pod_tensor!(i16, shape, bytes),
        DataType::Int32 => pod_tensor!(i32, shape, bytes),
        DataType::Int64 => pod_tensor!(i64, shape, bytes),
        DataType::Fp16 => pod_tensor!(half::f16, shape, bytes),
        DataType::Bf16 => pod_tensor!(half::bf16, shape, bytes),
        DataType::Fp32 => pod_tensor!(f32, shape, bytes),
        DataType::Fp64 => pod_tensor!(f64, shape, bytes),
        // BYTES tensors always carry string data and were handled above.
        DataType::Bytes => Err(ort::Error::new("BYTES tensor without string data")),
    };
    value.map_err(internal)
}

macro_rules! pod_bytes {
    ($value:expr, $ty:ty) => {{
        let (shape, data) = $value.try_extract_tensor::<$ty>().map_err(internal)?;
        (
            shape.to_vec(),
            TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(data))),
        )
    }};
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, BackendError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(BackendError::Internal(format!(
            "output '{name}' is not a tensor"
        )));
    };
    let datatype = datatype_of(*ty).ok_or_else(|| {
        BackendError::Internal(format!(
            "output '{name}' has unsupported element type {ty:?}"
        ))
    })?;
    let (shape, data): (Vec<i64>, TensorData) = match datatype {
        DataType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>().map_err(internal)?;
            let bytes: Vec<u8> = data.iter().map(|&flag| u8::from(flag)).collect();
            (shape.to_vec(), TensorData::Fixed(Bytes::from(bytes)))
        }
        DataType::Uint8 => pod_bytes!(value, u8),
        DataType::Uint16 => pod_bytes!(value, u16),
        DataType::Uint32 => pod_bytes!(value, u32),
        DataType::Uint64 => pod_bytes!(value, u64),
        DataType::Int8 => pod_bytes!(value, i8),
        DataType::Int16 => pod_bytes!(value, i16),
        DataType::Int32 => pod_bytes!(value, i32),
        DataType::Int64 => pod_bytes!(value, i64),
        DataType::Fp16 => pod_bytes!(value, half::f16),
        DataType::Bf16 => pod_bytes!(value, half::bf16),
        DataType::Fp32 => pod_bytes!(value, f32),
        DataType::Fp64 => pod_bytes!(value, f64),
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(internal)?;
            let items = strings
                .into_iter()
                .map(|text| Bytes::from(text.into_bytes()))
                .collect();
            (shape.to_vec(), TensorData::Strings(items))
        }
    };
    Ok(Tensor {
        name: name.to_owned(),
        datatype,
        shape,
        data,
    })
}

impl Backend for OnnxBackend {
    /// An ONNX Runtime session may run on any thread, one call at a time.
    fn runs_on_any_thread(&self) -> bool {
        true
    }

    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        // Inputs arrive in signature order, which is the session's input
        // order: pass them by position, no name lookups.
        let values = inputs
            .iter()
            .map(|tensor| to_ort(tensor).map(SessionInputValue::from))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = self.session.run(values.as_slice()).map_err(|error| {
            // ORT reports shape problems of a request (e.g. an unexpected
            // dimension inside the graph) as invalid arguments.
            if error.code() == ort::error::ErrorCode::InvalidArgument {
                BackendError::InvalidInput(error.to_string())
            } else {
                BackendError::Internal(error.to_string())
            }
        })?;
        self.output_names
            .iter()
            .map(|name| {
                let value = outputs.get(name.as_str()).ok_or_else(|| {
                    BackendError::Internal(format!("model produced no output '{name}'"))
                })?;
                from_ort(name, value)
            })
            .collect()
    }
}
