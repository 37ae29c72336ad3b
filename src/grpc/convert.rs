//! Protobuf messages to and from the protocol's tensors: inputs (raw or typed contents),
//! requested outputs, the `timeout` parameter and `grpc-timeout` header, and statistics.

use super::proto;
use super::proto::infer_parameter::ParameterChoice;
use crate::v2::{self, Data, Datatype, Input, RequestedOutput, V2Error};

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`), if any.
pub(super) fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    // The protocol allows at most 8 digits (and so no overflow below).
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(value * 3600),
        "M" => std::time::Duration::from_secs(value * 60),
        "S" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_millis(value),
        "u" => std::time::Duration::from_micros(value),
        "n" => std::time::Duration::from_nanos(value),
        _ => return None,
    })
}

/// The v2 `timeout` parameter, in microseconds as Triton reads it.
pub(super) fn timeout_parameter(
    request: &proto::ModelInferRequest,
) -> Result<Option<std::time::Duration>, V2Error> {
    match request
        .parameters
        .get("timeout")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        // Triton reads 0 as "no timeout".
        None | Some(ParameterChoice::Int64Param(0)) | Some(ParameterChoice::Uint64Param(0)) => {
            Ok(None)
        }
        Some(ParameterChoice::Int64Param(us)) if *us > 0 => {
            Ok(Some(std::time::Duration::from_micros(*us as u64)))
        }
        Some(ParameterChoice::Uint64Param(us)) if *us > 0 => {
            Ok(Some(std::time::Duration::from_micros(*us)))
        }
        Some(other) => Err(invalid(format!(
            "parameter \"timeout\" must be a positive number of microseconds, not {other:?}"
        ))),
    }
}

/// The request's priority level: the `priority` parameter (Triton's), else `priority`
/// metadata; 1 is the highest, 0 the default.
pub(super) fn priority(
    request: &proto::ModelInferRequest,
    metadata: Option<&str>,
) -> Result<Option<u64>, V2Error> {
    match request
        .parameters
        .get("priority")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::Int64Param(level)) if *level >= 0 => Ok(Some(*level as u64)),
        Some(ParameterChoice::Uint64Param(level)) => Ok(Some(*level)),
        Some(other) => Err(invalid(format!(
            "parameter \"priority\" must be a level (1 = the highest, 0 = the default), not \
             {other:?}"
        ))),
        None => metadata
            .map(crate::priority::parse)
            .transpose()
            .map(Option::flatten)
            .map_err(|e| invalid(format!("priority metadata: {e}"))),
    }
}

fn invalid(message: String) -> V2Error {
    V2Error::InvalidArgument(message)
}

pub(super) fn requested_output(
    output: &proto::model_infer_request::InferRequestedOutputTensor,
) -> Result<RequestedOutput, V2Error> {
    let classification = match output
        .parameters
        .get("classification")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => None,
        Some(ParameterChoice::Int64Param(k)) if *k > 0 => Some(*k as usize),
        Some(ParameterChoice::Uint64Param(k)) if *k > 0 => Some(*k as usize),
        Some(other) => {
            return Err(invalid(format!(
                "output {:?}: classification must be a positive int64, not {other:?}",
                output.name
            )))
        }
    };
    Ok(RequestedOutput {
        name: output.name.clone(),
        classification,
    })
}

/// The inputs, with their data from `raw_input_contents` (one entry per input, in order) or
/// from their typed `contents`.
pub(super) fn inputs(
    tensors: Vec<proto::model_infer_request::InferInputTensor>,
    raw: Vec<bytes::Bytes>,
) -> Result<Vec<Input>, V2Error> {
    if !raw.is_empty() && raw.len() != tensors.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input, or none",
            raw.len(),
            tensors.len()
        )));
    }
    let mut raw = raw.into_iter();
    tensors
        .into_iter()
        .map(|tensor| {
            let datatype = Datatype::parse(&tensor.datatype)?;
            let data = match (raw.next(), tensor.contents) {
                (Some(raw), _) => Data::from_raw(&tensor.name, datatype, raw)?,
                (None, Some(contents)) => typed_data(&tensor.name, datatype, contents)?,
                (None, None) => {
                    return Err(invalid(format!(
                        "input {:?} has neither contents nor raw_input_contents",
                        tensor.name
                    )))
                }
            };
            Ok(Input {
                name: tensor.name,
                datatype,
                shape: tensor.shape,
                data,
            })
        })
        .collect()
}

fn typed_data(
    name: &str,
    datatype: Datatype,
    contents: proto::InferTensorContents,
) -> Result<Data, V2Error> {
    Ok(match datatype {
        Datatype::Bytes => Data::Bytes(
            contents
                .bytes_contents
                .into_iter()
                .map(bytes::Bytes::from)
                .collect(),
        ),
        // UINT8 travels in `uint_contents`, one u32 per element.
        Datatype::Uint8 => Data::Uint8(
            contents
                .uint_contents
                .iter()
                .map(|&v| {
                    u8::try_from(v).map_err(|_| {
                        invalid(format!(
                            "input {name:?}: UINT8 element {v} is larger than 255"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Fp32 => Data::Fp32(contents.fp32_contents),
        _ => Data::Unsupported,
    })
}

fn duration(d: v2::StatisticDuration) -> Option<proto::StatisticDuration> {
    Some(proto::StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

pub(super) fn statistics(stats: v2::ModelStats) -> proto::ModelStatistics {
    let s = stats.inference_stats;
    proto::ModelStatistics {
        name: stats.name,
        version: stats.version,
        last_inference: stats.last_inference,
        inference_count: stats.inference_count,
        execution_count: stats.execution_count,
        inference_stats: Some(proto::InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            cache_hit: None,
            cache_miss: None,
        }),
        batch_stats: stats
            .batch_stats
            .into_iter()
            .map(|b| proto::InferBatchStatistics {
                batch_size: b.batch_size,
                compute_input: duration(b.compute_input),
                compute_infer: duration(b.compute_infer),
                compute_output: duration(b.compute_output),
            })
            .collect(),
        memory_usage: Vec::new(),
        response_stats: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&metadata), None);
        metadata.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            grpc_timeout(&metadata),
            Some(std::time::Duration::from_millis(250))
        );
        metadata.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(
            grpc_timeout(&metadata),
            Some(std::time::Duration::from_secs(3))
        );
        for bad in ["x", "S", "999999999H"] {
            metadata.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&metadata), None, "{bad}");
        }
    }

    #[test]
    fn uint8_typed_contents_must_fit_a_byte() {
        let contents = proto::InferTensorContents {
            uint_contents: vec![0, 255, 256],
            ..Default::default()
        };
        let err = typed_data("pixels", Datatype::Uint8, contents).unwrap_err();
        assert!(err.to_string().contains("256"), "{err}");
    }

    #[test]
    fn raw_contents_need_one_entry_per_input() {
        let tensor = proto::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        };
        let raw = vec![bytes::Bytes::new(), bytes::Bytes::new()];
        let err = inputs(vec![tensor], raw).unwrap_err();
        assert!(err.to_string().contains("one per input"), "{err}");
    }
}
