//! The shared-memory object index (`shoal_shm`): what a local client does for a hit without
//! a syscall (`FastReader::get` + `release`: seqlock read, key compare in the arena, pin),
//! and what the worker does to make an object visible and withdraw it (`IndexWriter`).
use criterion::{BenchmarkId, Criterion, Throughput};
use shoal_protocol::Namespace;
use shoal_shm::{key_hash, Arena, Ctl, FastReader, IndexEntry, IndexWriter, ReadMap};
use std::sync::Arc;

/// Objects published before timing; the region has the dataworker's default layout
/// (16,384 buckets of 8 slots, 1,024 pins per client).
const OBJECTS: usize = 10_000;
const SPAN: u64 = 128;

fn name(i: usize) -> Vec<u8> {
    format!("o{i:08}").into_bytes()
}

/// Entry `i`: a 64-byte payload at `i * SPAN`, its name right after it (as the store lays it).
fn entry(arena: &Arena, tag: u8, i: usize) -> IndexEntry {
    let name = name(i);
    let offset = i as u64 * SPAN;
    arena.write(offset + 64, &name).unwrap();
    IndexEntry {
        tag,
        hash: key_hash(tag, &name),
        gen: i as u64 + 1,
        offset,
        len: 64,
        key_off: offset + 64,
        key_len: name.len() as u32,
        segment: false,
    }
}

pub(crate) fn index(c: &mut Criterion) {
    let mut g = c.benchmark_group("shm_index");
    g.throughput(Throughput::Elements(1));
    let tag = Namespace::Object.tag();
    let size = (OBJECTS as u64 + 1) * SPAN;
    let arena = Arena::create_worker_only("shoal-bench-arena", size, false).unwrap();
    let view = ReadMap::open(arena.read_only_fd().unwrap(), size, false).unwrap();
    let ctl = Arc::new(Ctl::create(1 << 14, 1, 1024).unwrap());
    let mut writer = IndexWriter::new(ctl.clone()).unwrap();
    let page = ctl.new_pin_page().unwrap();
    let mine = ctl
        .open_pin_page(page.fd().try_clone_to_owned().unwrap())
        .unwrap();
    assert!(writer.attach(0, page, 0));
    let mut published = 0;
    for i in 0..OBJECTS {
        published += usize::from(writer.publish(entry(&arena, tag, i)));
    }
    assert_eq!(published, OBJECTS, "every bench object fits its bucket");
    let reader = FastReader::new(ctl, mine);
    let names: Vec<Vec<u8>> = (0..OBJECTS).map(name).collect();

    let mut i = 0usize;
    g.bench_function(BenchmarkId::new("get_release_hit", OBJECTS), |b| {
        b.iter(|| {
            i = (i + 7919) % OBJECTS;
            let pin = reader.get(&view, tag, &names[i]).unwrap();
            reader.release(pin);
        })
    });
    let absent = name(OBJECTS);
    g.bench_function(BenchmarkId::new("get_miss", OBJECTS), |b| {
        b.iter(|| reader.get(&view, tag, &absent))
    });
    let extra = entry(&arena, tag, OBJECTS);
    g.bench_function(BenchmarkId::new("publish_unpublish", OBJECTS), |b| {
        b.iter(|| {
            writer.publish(extra);
            writer.unpublish(extra.gen)
        })
    });
    g.finish();
}
