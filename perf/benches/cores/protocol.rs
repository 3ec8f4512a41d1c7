//! Frame encode and decode (`[u32 len][u8 version][postcard body]`) for the two frames on
//! the hot paths: a dataworker `Get` request and a proxy `Call` with an inline argument.
use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput};
use shoal_protocol::{
    encode_frame, CallerFrame, ClientFrame, FrameDecoder, ObjectId, Payload, Request,
};
use std::hint::black_box;

fn get_request() -> ClientFrame {
    ClientFrame {
        id: 42,
        req: Request::Get {
            ids: vec![ObjectId::new("results/2026/part-00017").unwrap()],
            timeout_ms: 1_000,
        },
    }
}

fn call(arg_bytes: usize) -> CallerFrame {
    CallerFrame::Call {
        id: 42,
        function: "resize-image".to_owned(),
        instance: None,
        args: Payload::Inline(vec![7; arg_bytes]),
        timeout_ms: 30_000,
        trace_id: 0x5348_4f41_4c00_0001,
    }
}

fn bench<T>(c: &mut Criterion, group: &str, input: &str, frame: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(128 << 10);
    g.bench_function(BenchmarkId::new("encode", input), |b| {
        b.iter(|| {
            out.clear();
            encode_frame(black_box(frame), &mut out).unwrap();
        })
    });
    let decoder = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::with_capacity(out.len());
    g.bench_function(BenchmarkId::new("decode", input), |b| {
        b.iter(|| {
            buf.extend_from_slice(&out);
            decoder.decode::<T>(&mut buf).unwrap().unwrap()
        })
    });
    g.finish();
}

pub(crate) fn frames(c: &mut Criterion) {
    bench(c, "frame_get", "1_id", &get_request());
    for bytes in [64usize, 64 << 10] {
        bench(c, "frame_call", &format!("{bytes}B"), &call(bytes));
    }
}
