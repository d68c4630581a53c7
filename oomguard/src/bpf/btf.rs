//! Just enough of a BTF reader to find struct member offsets, type sizes and enum values in
//! `/sys/kernel/btf/vmlinux`: the layout the eBPF programs read kernel structs with (Rust eBPF
//! has no CO-RE). aya's own BTF types keep these accessors private.

use std::borrow::Cow;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// Arrays of arrays nested deeper than this have no size (the kernel's nest two or three).
const MAX_ARRAY_DEPTH: u32 = 16;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// What went wrong reading BTF or finding something in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("not BTF data ({0})")]
    Malformed(&'static str),
    #[error("no struct {0} in BTF")]
    NoStruct(String),
    #[error("no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("member {member} of struct {strukt} is a bitfield")]
    Bitfield { strukt: String, member: String },
    #[error("no enum value {0} in BTF")]
    NoEnumValue(String),
    #[error("enum value {0} is defined more than once with different values")]
    AmbiguousEnumValue(String),
    #[error("type {0} has no size")]
    NoSize(u32),
}

/// One type record: where its kind-specific data starts in the type section.
#[derive(Debug, Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    data: usize,
}

/// A parsed BTF blob (types and strings), with lookups by name.
pub struct Btf {
    types: Vec<Type>,
    type_section: Vec<u8>,
    strings: Vec<u8>,
}

/// A struct member found by [`Btf::member`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outermost struct.
    pub offset: u32,
    /// Size of the member's type in bytes.
    pub size: u32,
    /// Element count when the member is an array, else 0.
    pub array_len: u32,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

impl Btf {
    /// Parses little-endian BTF (the host's, on every architecture this agent runs on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(BtfError::Malformed("too short"))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let field = |at| u32_at(data, at).ok_or(BtfError::Malformed("truncated header"));
        let hdr_len = field(4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Malformed("short header"));
        }
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let type_section = section(type_off, type_len)?.to_vec();
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = Vec::new();
        let mut at = 0;
        while at < type_section.len() {
            let word = |i: usize| {
                u32_at(&type_section, at + 4 * i).ok_or(BtfError::Malformed("truncated type"))
            };
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let data = at + 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                0..=19 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(Type {
                name_off,
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type,
                data,
            });
            at = data + extra;
        }
        Ok(Self {
            types,
            type_section,
            strings,
        })
    }

    fn name(&self, off: u32) -> Cow<'_, str> {
        let start = (off as usize).min(self.strings.len());
        let end = self.strings[start..]
            .iter()
            .position(|&b| b == 0)
            .map_or(self.strings.len(), |n| start + n);
        String::from_utf8_lossy(&self.strings[start..end])
    }

    /// Type `id` (1-based; 0 is void).
    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn word(&self, at: usize) -> u32 {
        u32_at(&self.type_section, at).unwrap_or(0)
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.get(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type;
                }
                _ => break,
            }
        }
        id
    }

    /// Size in bytes of type `id`.
    pub fn type_size(&self, id: u32) -> Result<u32, BtfError> {
        self.sized(id, 0)
    }

    /// [`Self::type_size`], `depth` arrays deep: bounded, since malformed BTF can make an array
    /// its own element type.
    fn sized(&self, id: u32, depth: u32) -> Result<u32, BtfError> {
        let id = self.resolve(id);
        let t = self.get(id).ok_or(BtfError::NoSize(id))?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Ok(t.size_or_type),
            KIND_PTR => Ok(std::mem::size_of::<usize>() as u32),
            KIND_ARRAY if depth < MAX_ARRAY_DEPTH => {
                let (elem, nelems) = (self.word(t.data), self.word(t.data + 8));
                Ok(self.sized(elem, depth + 1)?.saturating_mul(nelems))
            }
            _ => Err(BtfError::NoSize(id)),
        }
    }

    /// The id of the struct called `name` (its full definition, not a forward declaration).
    pub fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name)
            .map(|i| i as u32 + 1)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// `sizeof(struct name)`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        self.type_size(self.struct_id(name)?)
    }

    /// Finds `member` of `struct strukt`, looking inside anonymous structs and unions (the
    /// kernel nests most of `mm_struct` in one).
    pub fn member(&self, strukt: &str, member: &str) -> Result<Member, BtfError> {
        let id = self.struct_id(strukt)?;
        match self.find_member(id, member, 0, 0)? {
            Some(found) => Ok(found),
            None => Err(BtfError::NoMember {
                strukt: strukt.to_string(),
                member: member.to_string(),
            }),
        }
        .map_err(|err| match err {
            BtfError::Bitfield { member, .. } => BtfError::Bitfield {
                strukt: strukt.to_string(),
                member,
            },
            other => other,
        })
    }

    fn find_member(
        &self,
        id: u32,
        wanted: &str,
        base_bits: u32,
        depth: u32,
    ) -> Result<Option<Member>, BtfError> {
        let Some(t) = self.get(id) else {
            return Ok(None);
        };
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return Ok(None);
        }
        for i in 0..t.vlen as usize {
            let at = t.data + 12 * i;
            let (name_off, member_type, raw_offset) =
                (self.word(at), self.word(at + 4), self.word(at + 8));
            let (bit_offset, bitfield_size) = if t.kind_flag {
                (raw_offset & 0xff_ffff, raw_offset >> 24)
            } else {
                (raw_offset, 0)
            };
            // Nested anonymous members add their offsets up: past u32, the blob is broken.
            let bits = base_bits
                .checked_add(bit_offset)
                .ok_or(BtfError::Malformed("a member offset past 2^32 bits"))?;
            let name = self.name(name_off);
            if name == wanted {
                if bitfield_size != 0 || !bits.is_multiple_of(8) {
                    return Err(BtfError::Bitfield {
                        strukt: String::new(),
                        member: wanted.to_string(),
                    });
                }
                let resolved = self.resolve(member_type);
                let array_len = match self.get(resolved) {
                    Some(a) if a.kind == KIND_ARRAY => self.word(a.data + 8),
                    _ => 0,
                };
                return Ok(Some(Member {
                    offset: bits / 8,
                    size: self.type_size(member_type)?,
                    array_len,
                }));
            }
            if name.is_empty()
                && let Some(found) =
                    self.find_member(self.resolve(member_type), wanted, bits, depth + 1)?
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// The value of the enumerator `name`, in whichever enum defines it.
    pub fn enum_value(&self, name: &str) -> Result<i64, BtfError> {
        let mut found: Option<i64> = None;
        for t in &self.types {
            let values: Box<dyn Iterator<Item = (u32, i64)>> = match t.kind {
                KIND_ENUM => Box::new((0..t.vlen as usize).map(|i| {
                    let at = t.data + 8 * i;
                    (self.word(at), i64::from(self.word(at + 4) as i32))
                })),
                KIND_ENUM64 => Box::new((0..t.vlen as usize).map(|i| {
                    let at = t.data + 12 * i;
                    let value = u64::from(self.word(at + 4)) | (u64::from(self.word(at + 8)) << 32);
                    (self.word(at), value as i64)
                })),
                _ => continue,
            };
            for (name_off, value) in values {
                if self.name(name_off) == name {
                    match found {
                        Some(previous) if previous != value => {
                            return Err(BtfError::AmbiguousEnumValue(name.to_string()));
                        }
                        _ => found = Some(value),
                    }
                }
            }
        }
        found.ok_or_else(|| BtfError::NoEnumValue(name.to_string()))
    }

    /// The arguments of tracepoint `name` after the leading `void *`, with their types spelled
    /// as in C (`struct task_struct *`, `int`, `bool`), from its `btf_trace_<name>` typedef;
    /// `None` when the kernel has no such tracepoint.
    pub fn tracepoint_args(&self, name: &str) -> Option<Vec<String>> {
        let typedef = format!("btf_trace_{name}");
        let t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_TYPEDEF && self.name(t.name_off) == typedef)?;
        let ptr = self.get(t.size_or_type).filter(|p| p.kind == KIND_PTR)?;
        let proto = self
            .get(ptr.size_or_type)
            .filter(|p| p.kind == KIND_FUNC_PROTO)?;
        Some(
            (1..proto.vlen as usize)
                .map(|i| self.type_name(self.word(proto.data + 8 * i + 4), 0))
                .collect(),
        )
    }

    /// Type `id` as C spells it, qualifiers left out.
    fn type_name(&self, id: u32, depth: u32) -> String {
        let Some(t) = self.get(id).filter(|_| depth < 16) else {
            return "void".into();
        };
        let name = self.name(t.name_off);
        match t.kind {
            KIND_PTR => format!("{} *", self.type_name(t.size_or_type, depth + 1)),
            KIND_STRUCT => format!("struct {name}"),
            KIND_UNION => format!("union {name}"),
            KIND_ENUM | KIND_ENUM64 => format!("enum {name}"),
            KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                self.type_name(t.size_or_type, depth + 1)
            }
            KIND_ARRAY => format!("{}[]", self.type_name(self.word(t.data), depth + 1)),
            KIND_FUNC_PROTO => "function".into(),
            _ => name.into_owned(),
        }
    }

    /// Whether a typedef called `name` exists; `btf_trace_<tracepoint>` typedefs name every
    /// tracepoint the kernel has.
    pub fn has_typedef(&self, name: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.kind == KIND_TYPEDEF && self.name(t.name_off) == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF blobs for the tests.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: vec![0],
                ..Self::default()
            }
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn words(&mut self, words: &[u32]) -> u32 {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.count += 1;
            self.count
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            let n = self.string(name);
            self.words(&[n, KIND_INT << 24, size, size * 8])
        }
        fn ptr(&mut self, to: u32) -> u32 {
            self.words(&[0, KIND_PTR << 24, to])
        }
        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.words(&[0, KIND_ARRAY << 24, 0, elem, index, n])
        }
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let n = self.string(name);
            let mut words = vec![n, (kind << 24) | members.len() as u32, size];
            for (member, ty, bits) in members {
                let m = self.string(member);
                words.extend_from_slice(&[m, *ty, *bits]);
            }
            self.words(&words)
        }
        fn enumeration(&mut self, values: &[(&str, i32)]) -> u32 {
            let mut words = vec![0, (KIND_ENUM << 24) | values.len() as u32, 4];
            for (name, value) in values {
                let n = self.string(name);
                words.extend_from_slice(&[n, *value as u32]);
            }
            self.words(&words)
        }
        fn typedef(&mut self, name: &str, to: u32) -> u32 {
            let n = self.string(name);
            self.words(&[n, KIND_TYPEDEF << 24, to])
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Btf {
        let mut b = Builder::new();
        let long = b.int("long", 8);
        let int = b.int("int", 4);
        let counter = b.composite(
            KIND_STRUCT,
            "percpu_counter",
            40,
            &[("lock", int, 0), ("count", long, 64)],
        );
        let counters = b.array(counter, int, 4);
        let atomic = b.typedef("atomic_long_t", long);
        let inner = b.composite(
            KIND_STRUCT,
            "",
            200,
            &[("pgtables_bytes", atomic, 0), ("rss_stat", counters, 64)],
        );
        let task = b.composite(KIND_STRUCT, "task_struct", 16, &[("pid", int, 0)]);
        let task_ptr = b.ptr(task);
        b.composite(
            KIND_STRUCT,
            "mm_struct",
            512,
            &[
                ("mm_count", int, 0),
                ("", inner, 64 * 8),
                ("owner", task_ptr, 400 * 8),
            ],
        );
        b.enumeration(&[
            ("MM_FILEPAGES", 0),
            ("MM_ANONPAGES", 1),
            ("MM_SHMEMPAGES", 3),
        ]);
        b.enumeration(&[("PGPGIN", 0), ("PGPGOUT", 1)]);
        let mm = b.composite(KIND_STRUCT, "mm_struct", 0, &[]);
        let mm_ptr = b.ptr(mm);
        let proto = b.words(&[0, (KIND_FUNC_PROTO << 24) | 3, 0, 0, 0, 0, mm_ptr, 0, int]);
        let proto_ptr = b.ptr(proto);
        b.typedef("btf_trace_rss_stat", proto_ptr);
        Btf::parse(&b.build()).unwrap()
    }

    #[test]
    fn finds_members_inside_anonymous_structs() {
        let btf = sample();
        assert_eq!(
            btf.member("mm_struct", "rss_stat").unwrap(),
            Member {
                offset: 72,
                size: 160,
                array_len: 4
            }
        );
        assert_eq!(
            btf.member("mm_struct", "pgtables_bytes").unwrap().offset,
            64
        );
        assert_eq!(
            btf.member("mm_struct", "owner").unwrap(),
            Member {
                offset: 400,
                size: 8,
                array_len: 0
            }
        );
        assert_eq!(btf.member("percpu_counter", "count").unwrap().offset, 8);
        assert_eq!(btf.struct_size("percpu_counter").unwrap(), 40);
    }

    #[test]
    fn reports_what_is_missing() {
        let btf = sample();
        assert_eq!(
            btf.member("mm_struct", "nope"),
            Err(BtfError::NoMember {
                strukt: "mm_struct".into(),
                member: "nope".into()
            })
        );
        assert_eq!(
            btf.struct_id("mem_cgroup"),
            Err(BtfError::NoStruct("mem_cgroup".into()))
        );
        assert_eq!(
            btf.enum_value("MM_SWAPENTS"),
            Err(BtfError::NoEnumValue("MM_SWAPENTS".into()))
        );
    }

    #[test]
    fn reads_enum_values_and_typedefs() {
        let btf = sample();
        assert_eq!(btf.enum_value("MM_SHMEMPAGES"), Ok(3));
        assert_eq!(btf.enum_value("PGPGOUT"), Ok(1));
        assert!(btf.has_typedef("btf_trace_rss_stat"));
        assert!(!btf.has_typedef("btf_trace_nope"));
    }

    #[test]
    fn spells_tracepoint_arguments() {
        let btf = sample();
        assert_eq!(
            btf.tracepoint_args("rss_stat"),
            Some(vec!["struct mm_struct *".to_string(), "int".to_string()])
        );
        assert_eq!(btf.tracepoint_args("nope"), None);
    }

    #[test]
    fn member_offsets_adding_up_past_u32_are_malformed_not_an_overflow() {
        // Found by the `btf` fuzz target: an anonymous struct at bit offset 0xffff_fff0
        // holding the wanted member at bit offset 0x100.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let inner = b.composite(KIND_STRUCT, "", 64, &[("deep", int, 0x100)]);
        b.composite(KIND_STRUCT, "outer", 64, &[("", inner, 0xffff_fff0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(
            matches!(btf.member("outer", "deep"), Err(BtfError::Malformed(_))),
            "{:?}",
            btf.member("outer", "deep").map(|m| m.offset)
        );
    }

    #[test]
    fn an_array_of_itself_has_no_size() {
        // Found by the btf fuzz target: type_size recursed until the stack overflowed.
        let mut b = Builder::new();
        let int = b.int("int", 4);
        let array = b.array(int + 1, int, 2);
        assert_eq!(array, int + 1, "the array is its own element type");
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.type_size(array), Err(BtfError::NoSize(array)));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());
        let mut truncated = Builder::new().build();
        truncated[12] = 200;
        assert!(Btf::parse(&truncated).is_err());
    }
}
