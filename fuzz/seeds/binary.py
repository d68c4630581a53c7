"""Writes the binary seeds. seeds/btf/offsets-complete: a small BTF blob holding every struct
member, enum value and typedef that oomguard::bpf::offsets::from_btf looks up (layouts as on
x86-64 6.x kernels, trimmed to those members), so the btf target starts from input that parses
all the way. seeds/ring_record/*: one record of each layout (oomguard_common::Event and
CgroupEvent, little-endian). Run from fuzz/: python3 seeds/binary.py"""

import struct

INT, PTR, ARRAY, STRUCT, ENUM, TYPEDEF = 1, 2, 3, 4, 6, 8

strings = bytearray(b"\0")
types = bytearray()
count = 0


def name(s):
    if not s:
        return 0
    off = len(strings)
    strings.extend(s.encode() + b"\0")
    return off


def add(*words):
    global count
    types.extend(struct.pack("<%dI" % len(words), *words))
    count += 1
    return count


def integer(n, size):
    return add(name(n), INT << 24, size, size * 8)


def composite(n, size, members):
    words = [name(n), (STRUCT << 24) | len(members), size]
    for member, ty, byte_off in members:
        words += [name(member), ty, byte_off * 8]
    return add(*words)


def enum(n, values):
    words = [name(n), (ENUM << 24) | len(values), 4]
    for v, x in values:
        words += [name(v), x]
    return add(*words)


char = integer("char", 1)
short = integer("short", 2)
i32 = integer("int", 4)
i64 = integer("long", 8)
u64 = integer("u64", 8)
atomic = add(name("atomic_long_t"), TYPEDEF << 24, i64)
void_ptr = add(0, PTR << 24, 0)
counter = composite("page_counter", 64, [("usage", atomic, 0), ("max", i64, 8)])
css = composite("cgroup_subsys_state", 200, [("cgroup", void_ptr, 0), ("parent", void_ptr, 136)])
composite("mem_cgroup", 4096, [("css", css, 0), ("memory", counter, 256)])
css_ptrs = add(0, ARRAY << 24, 0, void_ptr, i32, 14)
composite("css_set", 256, [("subsys", css_ptrs, 8)])
enum("cgroup_subsys_id", [("cpuset_cgrp_id", 0), ("memory_cgrp_id", 4)])
composite("cgroup", 2048, [("kn", void_ptr, 264)])
composite("kernfs_node", 128, [("id", u64, 96)])
task = composite(
    "task_struct",
    8192,
    [("pid", i32, 2464), ("tgid", i32, 2468), ("mm", void_ptr, 2320), ("signal", void_ptr, 3000), ("cgroups", void_ptr, 3488)],
)
task_ptr = add(0, PTR << 24, task)
composite("signal_struct", 1024, [("oom_score_adj", short, 770)])
percpu = composite("percpu_counter", 40, [("lock", i32, 0), ("count", i64, 8)])
rss = add(0, ARRAY << 24, 0, percpu, i32, 4)
anon = composite("", 1024, [("pgtables_bytes", atomic, 0), ("rss_stat", rss, 64)])
composite("mm_struct", 1408, [("mm_count", i32, 0), ("", anon, 64), ("owner", task_ptr, 1200)])
enum("", [("MM_FILEPAGES", 0), ("MM_ANONPAGES", 1), ("MM_SWAPENTS", 2), ("MM_SHMEMPAGES", 3)])
enum("node_stat_item", [("PGPGIN", 0), ("PGPGOUT", 1)])
add(name("btf_trace_rss_stat"), TYPEDEF << 24, task_ptr)

header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
with open("seeds/btf/offsets-complete", "wb") as f:
    f.write(header + types + strings)


def event(kind, pid, cg, kt, usage, thr, a=0, f=0, s=0, adj=0):
    return struct.pack("<IIQQQQQQQiI", kind, pid, cg, kt, usage, thr, a, f, s, adj, 0)


def cgroup_event(kind, level, cg, kt, path):
    p = path + b"\0"
    return struct.pack("<IIQQII", kind, level, cg, kt, len(p), 0) + p.ljust(480, b"\0")


records = {
    "kill-crossed": event(2, 4242, 4711, 123456789, 980 << 20, 980 << 20),
    "at-limit": event(3, 4242, 4711, 123456790, 1000 << 20, 1000 << 20),
    "kernel-oom-victim": event(4, 4242, 4711, 123456791, 1000 << 20, 1000 << 20, 250000, 1000, 0, 900),
    "cgroup-mkdir": cgroup_event(
        5, 3, 4712, 123456792, b"/kubepods/burstable/pod8a6c2f0e-51b4-4c3e-9d7a-2b1f0e9c8d7a"
    ),
}
for file, record in records.items():
    with open("seeds/ring_record/" + file, "wb") as f:
        f.write(record)
