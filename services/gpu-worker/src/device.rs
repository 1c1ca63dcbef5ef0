//! Compute device selection: CUDA when compiled in (`--features cuda`) and a
//! GPU answers, the CPU otherwise.

use candle_core::{Device, DeviceLocation};
use shamal_worker::backend::InstanceDevice;

use crate::spec::{DType, DevicePreference};

/// True when this binary was built with candle's CUDA backend.
pub const CUDA_COMPILED: bool = cfg!(feature = "cuda");

/// The label of a device as reported in logs, metrics and model
/// configurations: `cpu` or `cuda:<ordinal>`.
pub fn label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_owned(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device as the model configuration reports it (`KIND_GPU` with its
/// ordinal, or `KIND_CPU`).
pub fn instance_device(device: &Device) -> InstanceDevice {
    match device.location() {
        DeviceLocation::Cpu => InstanceDevice::Cpu,
        DeviceLocation::Cuda { gpu_id } | DeviceLocation::Metal { gpu_id } => {
            InstanceDevice::Gpu(u32::try_from(gpu_id).unwrap_or(u32::MAX))
        }
    }
}

/// Why a device cannot be had, or cannot run a model as its spec asks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Half precision asked for on a device that is not a GPU.
    #[error(
        "the model asks for dtype \"{}\", which needs a CUDA device; it runs on {device} \
         (use \"float32\" on the CPU)",
        dtype.as_str()
    )]
    HalfPrecisionOffGpu {
        dtype: DType,
        /// The device's [`label`].
        device: String,
    },
    /// CUDA asked for from a binary built without the `cuda` feature.
    #[error("this shamal-gpu-worker was built without CUDA support (build with --features cuda)")]
    CudaNotCompiled,
    /// The CUDA device cannot be opened (no GPU, no driver, a bad ordinal).
    #[error("CUDA device {ordinal} is not available: {source}")]
    CudaUnavailable {
        ordinal: usize,
        source: candle_core::Error,
    },
    /// candle or cudarc panicked while opening the CUDA device.
    #[error("CUDA device {ordinal} is not available: CUDA initialisation panicked")]
    CudaPanicked { ordinal: usize },
    /// A model requires CUDA and the worker runs on the CPU.
    #[error(
        "the model requires device \"cuda\" but this worker runs on {worker}{}",
        if CUDA_COMPILED {
            " (no usable GPU was found at start-up)"
        } else {
            " (built without the cuda feature)"
        }
    )]
    CudaRequired {
        /// The worker's device [`label`].
        worker: String,
    },
}

/// The candle dtype a model computes in. Half precision is CUDA only: on
/// the CPU it is refused, never silently computed in F32.
pub fn compute_dtype(dtype: DType, device: &Device) -> Result<candle_core::DType, Error> {
    match dtype {
        DType::Float32 => Ok(candle_core::DType::F32),
        DType::Float16 | DType::Bfloat16 if !device.is_cuda() => Err(Error::HalfPrecisionOffGpu {
            dtype,
            device: label(device),
        }),
        DType::Float16 => Ok(candle_core::DType::F16),
        DType::Bfloat16 => Ok(candle_core::DType::BF16),
    }
}

/// Opens CUDA device `ordinal`, explaining why it cannot be had.
pub fn open_cuda(ordinal: usize) -> Result<Device, Error> {
    if !CUDA_COMPILED {
        return Err(Error::CudaNotCompiled);
    }
    // candle 0.11 links the CUDA libraries (cudarc's `dynamic-linking`): a
    // binary built with `cuda` does not start where they are missing, and
    // where they are, a host without a GPU gets an error here. A panic
    // inside candle or cudarc must not abort a worker set to `auto` either:
    // it falls back to the CPU.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(source)) => Err(Error::CudaUnavailable { ordinal, source }),
        Err(_) => Err(Error::CudaPanicked { ordinal }),
    }
}

/// The worker's device for `preference`: `Cuda` requires a GPU, `Auto`
/// takes one when there is one.
pub fn select(preference: DevicePreference, ordinal: usize) -> Result<Device, Error> {
    match preference {
        DevicePreference::Cpu => Ok(Device::Cpu),
        DevicePreference::Cuda => open_cuda(ordinal),
        DevicePreference::Auto => {
            if !CUDA_COMPILED {
                return Ok(Device::Cpu);
            }
            match open_cuda(ordinal) {
                Ok(device) => Ok(device),
                Err(reason) => {
                    tracing::warn!(%reason, "no usable GPU; running on the CPU");
                    Ok(Device::Cpu)
                }
            }
        }
    }
}

/// The device a model runs on, given the worker's device and the model's
/// preference. A model asking for CUDA on a CPU-only worker is refused.
pub fn for_model(worker: &Device, preference: DevicePreference) -> Result<Device, Error> {
    match preference {
        DevicePreference::Auto => Ok(worker.clone()),
        DevicePreference::Cpu => Ok(Device::Cpu),
        DevicePreference::Cuda if worker.is_cuda() => Ok(worker.clone()),
        DevicePreference::Cuda => Err(Error::CudaRequired {
            worker: label(worker),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        let device = select(DevicePreference::Cpu, 0).unwrap();
        assert_eq!(label(&device), "cpu");
        assert_eq!(
            label(&for_model(&device, DevicePreference::Auto).unwrap()),
            "cpu"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_on_a_cpu_build_fails_clearly() {
        let error = select(DevicePreference::Cuda, 0).unwrap_err().to_string();
        assert!(error.contains("built without CUDA"), "{error}");
        assert_eq!(label(&select(DevicePreference::Auto, 0).unwrap()), "cpu");
        let error = for_model(&Device::Cpu, DevicePreference::Cuda)
            .unwrap_err()
            .to_string();
        assert!(error.contains("requires device \"cuda\""), "{error}");
        assert!(error.contains("built without the cuda feature"), "{error}");
    }

    #[test]
    fn half_precision_is_refused_on_the_cpu() {
        assert_eq!(
            compute_dtype(DType::Float32, &Device::Cpu).unwrap(),
            candle_core::DType::F32
        );
        for dtype in [DType::Float16, DType::Bfloat16] {
            let error = compute_dtype(dtype, &Device::Cpu).unwrap_err().to_string();
            assert!(error.contains(dtype.as_str()), "{error}");
            assert!(error.contains("needs a CUDA device"), "{error}");
        }
        assert_eq!(instance_device(&Device::Cpu), InstanceDevice::Cpu);
    }
}
