//! The bbolt database file format (etcd's backend): a streaming writer and a verifying reader.
//!
//! Written from the format's public description (`docs/formats.md`, Backup files); nothing here
//! knows etcd's buckets ([`crate::etcd_db`] maps Keel's tables into them).
//!
//! # Layout
//!
//! ```text
//! page header (16 bytes): id u64 | flags u16 | count u16 | overflow u32      (little-endian)
//!   flags: 0x01 branch, 0x02 leaf, 0x04 meta, 0x10 freelist
//!   a page whose data is over one page takes `overflow` more contiguous pages
//! meta (pages 0 and 1, after the header): magic 0xED0CDAED u32 | version 2 u32 | page_size u32 |
//!   flags u32 | root bucket { root pgid u64, sequence u64 } | freelist pgid u64 |
//!   pgid (pages in the file: the high-water mark) u64 | txid u64 | checksum u64
//!   (FNV-1a 64 of the meta bytes before it); the valid meta with the higher txid is current
//! leaf element (16 bytes): flags u32 (0x01: the value is a bucket) | pos u32 | ksize u32 | vsize u32
//! branch element (16 bytes): pos u32 | ksize u32 | pgid u64
//!   pos: from the element to its key; the key's value follows it. Keys ascend bytewise; a branch
//!   element's key is its child's first key.
//! bucket value: root pgid u64 | sequence u64, then (root 0: an inline bucket) a leaf page
//! freelist page: count free pgids u64 (count 0xFFFF: the real count is the first u64)
//! ```
//!
//! # Writing
//!
//! [`DbWriter`] writes pages in pgid order as they fill: meta 0 and 1, an empty freelist (page 2),
//! then each bucket's B+tree bottom-up (a leaf as soon as it is full, a branch page as soon as its
//! children are written), and the root bucket's leaf last. Every bucket is a real (non-inline)
//! bucket. Memory: one page under construction per tree level. The meta pages at the front need
//! the root's pgid and the page count, which are known only at the end: a writer is run twice over
//! the same input, once with a [`Layout`] of `None` (any byte sink: the bytes are the same length)
//! to learn the layout, then with it. Every page below the high-water mark is reachable exactly
//! once or free, as bbolt's `tx.Check()` requires.
//!
//! # Reading
//!
//! [`DbReader`] reads pages with positioned reads, checks every bound (pgids under the high-water
//! mark, element offsets inside their page, overflow inside the file), walks trees with a depth
//! limit and never visits a page twice in one walk (cycles and shared pages are errors), and
//! allocates no more than a page's bytes, which the file must hold. Bad input is an error, never a
//! panic.

use std::fs::File;
use std::io;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// The page size Keel writes (bbolt's on x86-64 Linux, and etcd's).
pub const PAGE_SIZE: usize = 4096;
/// bbolt's magic, at byte 16 of both meta pages.
pub const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const META_BYTES: usize = 64;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
/// A leaf element whose value is a bucket.
const BUCKET_LEAF: u32 = 0x01;
/// The meta's freelist pgid when the freelist is not stored (etcd 3.4's files).
const NO_FREELIST: u64 = u64::MAX;
/// Tree levels a reader follows before calling the file damaged (bbolt's trees are a few deep).
const MAX_DEPTH: usize = 64;
/// Buckets inside buckets a reader follows.
const MAX_NESTING: usize = 16;
/// The freelist page of files Keel writes.
const FREELIST_PGID: u64 = 2;
/// The first pgid of bucket pages in files Keel writes.
const FIRST_DATA_PGID: u64 = 3;

/// FNV-1a, 64 bits: the meta page checksum.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn page_header(out: &mut [u8], id: u64, flags: u16, count: u16, overflow: u32) {
    out[0..8].copy_from_slice(&id.to_le_bytes());
    out[8..10].copy_from_slice(&flags.to_le_bytes());
    out[10..12].copy_from_slice(&count.to_le_bytes());
    out[12..16].copy_from_slice(&overflow.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Where a file's root bucket is and how many pages it has: what the meta pages at its front say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub root: u64,
    /// The high-water mark: the file is `pages * PAGE_SIZE` bytes.
    pub pages: u64,
}

impl Layout {
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }
}

/// Why a database could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("bucket {name:?} does not sort after {after:?}")]
    BucketOrder { name: String, after: String },
    #[error("in bucket {bucket:?}: key {key:?} does not sort after the one before it")]
    KeyOrder { bucket: String, key: String },
    #[error("{what} without a bucket begun")]
    NoBucket { what: &'static str },
    #[error("a page of {0} elements: bbolt counts at most 65535")]
    TooManyElements(usize),
    #[error("the file's layout changed between the two passes ({expected:?} first, {got:?} then)")]
    LayoutChanged { expected: Layout, got: Layout },
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned()
}

/// One page being filled at one level of a tree: leaf elements `(flags, key, value)` or branch
/// elements `(key, child pgid)` (the value then empty).
#[derive(Default)]
struct Level {
    elements: Vec<(u32, Vec<u8>, Vec<u8>, u64)>,
    /// Bytes of the page so far, header included.
    bytes: usize,
    /// Pages of this level already written.
    written: u64,
}

/// A bucket's tree being built.
struct Tree {
    /// `levels[0]`: the leaf being filled; above it the branch pages.
    levels: Vec<Level>,
    last_key: Option<Vec<u8>>,
}

impl Tree {
    fn new() -> Self {
        Self { levels: vec![Level::default()], last_key: None }
    }
}

/// Writes a bbolt database in one pass over buckets and keys given in ascending order (see the
/// module docs for the two passes).
pub struct DbWriter<W: Write> {
    out: W,
    expected: Option<Layout>,
    next_pgid: u64,
    /// The root bucket's entries so far: name → the bucket's root pgid.
    buckets: Vec<(Vec<u8>, u64)>,
    current: Option<(Vec<u8>, Tree)>,
}

impl<W: Write> DbWriter<W> {
    /// Starts a file on `out`: its meta pages (from `layout`; zeros if None: a first pass) and
    /// the freelist page.
    pub fn new(mut out: W, layout: Option<Layout>) -> Result<Self, WriteError> {
        let l = layout.unwrap_or(Layout { root: 0, pages: 0 });
        for id in 0..2u64 {
            out.write_all(&meta_page(id, l))?;
        }
        let mut freelist = vec![0u8; PAGE_SIZE];
        page_header(&mut freelist, FREELIST_PGID, FREELIST, 0, 0);
        out.write_all(&freelist)?;
        Ok(Self { out, expected: layout, next_pgid: FIRST_DATA_PGID, buckets: Vec::new(), current: None })
    }

    /// Begins bucket `name` (ending the one before): names must ascend.
    pub fn begin_bucket(&mut self, name: &[u8]) -> Result<(), WriteError> {
        self.end_bucket()?;
        if let Some((last, _)) = self.buckets.last() {
            if name <= last.as_slice() {
                return Err(WriteError::BucketOrder { name: lossy(name), after: lossy(last) });
            }
        }
        self.current = Some((name.to_vec(), Tree::new()));
        Ok(())
    }

    /// Adds `key` → `value` to the bucket begun last: keys must ascend.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), WriteError> {
        let Some((name, mut tree)) = self.current.take() else {
            return Err(WriteError::NoBucket { what: "a put" });
        };
        if tree.last_key.as_deref().is_some_and(|last| key <= last) {
            let err = WriteError::KeyOrder { bucket: lossy(&name), key: lossy(key) };
            self.current = Some((name, tree));
            return Err(err);
        }
        tree.last_key = Some(key.to_vec());
        let result = self.add(&mut tree, 0, (0, key.to_vec(), value.to_vec(), 0));
        self.current = Some((name, tree));
        result
    }

    /// Adds one element to the page at `level`, writing the page first if it would not fit.
    fn add(
        &mut self,
        tree: &mut Tree,
        level: usize,
        element: (u32, Vec<u8>, Vec<u8>, u64),
    ) -> Result<(), WriteError> {
        if tree.levels.len() == level {
            tree.levels.push(Level::default());
        }
        let size = ELEMENT + element.1.len() + element.2.len();
        let l = &tree.levels[level];
        if !l.elements.is_empty() && (l.bytes + size > PAGE_SIZE || l.elements.len() == usize::from(u16::MAX))
        {
            self.flush(tree, level)?;
        }
        let l = &mut tree.levels[level];
        if l.elements.is_empty() {
            l.bytes = HEADER;
        }
        l.bytes += size;
        l.elements.push(element);
        Ok(())
    }

    /// Writes the page at `level` and hands its first key and pgid to the level above.
    fn flush(&mut self, tree: &mut Tree, level: usize) -> Result<(), WriteError> {
        let pgid = self.write_level(tree, level)?;
        let first = tree.levels[level].elements.first().map(|e| e.1.clone()).unwrap_or_default();
        tree.levels[level].elements.clear();
        tree.levels[level].written += 1;
        self.add(tree, level + 1, (0, first, Vec::new(), pgid))
    }

    /// Encodes and writes the page at `level`; answers its pgid.
    fn write_level(&mut self, tree: &Tree, level: usize) -> Result<u64, WriteError> {
        let l = &tree.levels[level];
        let count =
            u16::try_from(l.elements.len()).map_err(|_| WriteError::TooManyElements(l.elements.len()))?;
        let pages = l.bytes.max(HEADER).div_ceil(PAGE_SIZE);
        let mut page = vec![0u8; pages * PAGE_SIZE];
        let pgid = self.next_pgid;
        let overflow = u32::try_from(pages - 1).map_err(|_| io::Error::other("a page over 2^32 pages"))?;
        page_header(&mut page, pgid, if level == 0 { LEAF } else { BRANCH }, count, overflow);
        let mut data = HEADER + ELEMENT * l.elements.len();
        for (i, (flags, key, value, child)) in l.elements.iter().enumerate() {
            let at = HEADER + ELEMENT * i;
            let pos = u32::try_from(data - at).map_err(|_| io::Error::other("a page over 4 GiB"))?;
            let ksize = u32::try_from(key.len()).map_err(|_| io::Error::other("a key over 4 GiB"))?;
            let e = &mut page[at..at + ELEMENT];
            if level == 0 {
                let vsize = u32::try_from(value.len()).map_err(|_| io::Error::other("a value over 4 GiB"))?;
                e[0..4].copy_from_slice(&flags.to_le_bytes());
                e[4..8].copy_from_slice(&pos.to_le_bytes());
                e[8..12].copy_from_slice(&ksize.to_le_bytes());
                e[12..16].copy_from_slice(&vsize.to_le_bytes());
            } else {
                e[0..4].copy_from_slice(&pos.to_le_bytes());
                e[4..8].copy_from_slice(&ksize.to_le_bytes());
                e[8..16].copy_from_slice(&child.to_le_bytes());
            }
            page[data..data + key.len()].copy_from_slice(key);
            data += key.len();
            page[data..data + value.len()].copy_from_slice(value);
            data += value.len();
        }
        self.out.write_all(&page)?;
        self.next_pgid += pages as u64;
        Ok(pgid)
    }

    /// Writes what is left of `tree`, bottom-up; answers its root pgid.
    fn finish_tree(&mut self, tree: &mut Tree) -> Result<u64, WriteError> {
        let mut level = 0;
        loop {
            if tree.levels[level].written == 0 {
                // The only page of this level: the root (an empty leaf for an empty bucket).
                return self.write_level(tree, level);
            }
            if !tree.levels[level].elements.is_empty() {
                self.flush(tree, level)?;
            }
            level += 1;
        }
    }

    /// Ends the bucket begun last, if any, writing the rest of its tree.
    pub fn end_bucket(&mut self) -> Result<(), WriteError> {
        if let Some((name, mut tree)) = self.current.take() {
            let root = self.finish_tree(&mut tree)?;
            self.buckets.push((name, root));
        }
        Ok(())
    }

    /// Ends the last bucket, writes the root bucket; answers the file's layout (checked against
    /// the one given to [`DbWriter::new`], if any) and the sink.
    pub fn finish(mut self) -> Result<(Layout, W), WriteError> {
        self.end_bucket()?;
        let mut tree = Tree::new();
        for (name, root) in std::mem::take(&mut self.buckets) {
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&root.to_le_bytes());
            self.add(&mut tree, 0, (BUCKET_LEAF, name, value.to_vec(), 0))?;
        }
        let root = self.finish_tree(&mut tree)?;
        let layout = Layout { root, pages: self.next_pgid };
        if let Some(expected) = self.expected {
            if expected != layout {
                return Err(WriteError::LayoutChanged { expected, got: layout });
            }
        }
        self.out.flush()?;
        Ok((layout, self.out))
    }
}

/// Meta page `id` of a file of `layout`. Both metas describe the same tree; page 1's txid is the
/// higher, so it is current.
fn meta_page(id: u64, layout: Layout) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    page_header(&mut page, id, META, 0, 0);
    let m = &mut page[HEADER..HEADER + META_BYTES];
    m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    m[16..24].copy_from_slice(&layout.root.to_le_bytes());
    m[32..40].copy_from_slice(&FREELIST_PGID.to_le_bytes());
    m[40..48].copy_from_slice(&layout.pages.to_le_bytes());
    m[48..56].copy_from_slice(&(id + 1).to_le_bytes());
    let sum = fnv1a64(&m[..56]);
    m[56..64].copy_from_slice(&sum.to_le_bytes());
    page
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Why a file does not read as a bbolt database. Every variant names what is wrong; the caller
/// names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0} bytes is too short for a bbolt database (two meta pages)")]
    TooShort(u64),
    #[error("no valid meta page: {0}")]
    NoMeta(String),
    #[error(
        "the meta says {pages} pages of {page_size} bytes, more than the file's {len} bytes (truncated?)"
    )]
    Truncated { pages: u64, page_size: u64, len: u64 },
    #[error("page {id}: {why}")]
    Page { id: u64, why: String },
    #[error("a tree deeper than {MAX_DEPTH} levels (a cycle?) below page {0}")]
    TooDeep(u64),
    #[error("page {0} is reached twice (a cycle or a shared page)")]
    Revisited(u64),
    #[error("buckets nested deeper than {MAX_NESTING}")]
    TooNested,
    #[error("a bucket value of {0} bytes (at least 16)")]
    BadBucket(usize),
    #[error("keys out of order: {key:?} after {after:?}")]
    KeyOrder { key: String, after: String },
    #[error("{0}")]
    Check(String),
}

fn page_err(id: u64, why: impl Into<String>) -> ReadError {
    ReadError::Page { id, why: why.into() }
}

/// The current meta page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub page_size: u64,
    pub root: u64,
    pub freelist: u64,
    pub pages: u64,
    pub txid: u64,
}

/// A bucket's root: a page, or an inline leaf page held in its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bucket {
    Page(u64),
    Inline(Vec<u8>),
}

impl Bucket {
    /// Parses a bucket value (a leaf element flagged as a bucket).
    pub fn parse(value: &[u8]) -> Result<Bucket, ReadError> {
        if value.len() < 16 {
            return Err(ReadError::BadBucket(value.len()));
        }
        let root = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
        Ok(if root == 0 { Bucket::Inline(value[16..].to_vec()) } else { Bucket::Page(root) })
    }
}

/// What a walk calls for each element: `(key, value, is_bucket)`.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8], bool) -> Result<(), ReadError> + 'a;

/// One element of a page, as slices of the page's bytes.
enum Element<'p> {
    Leaf { flags: u32, key: &'p [u8], value: &'p [u8] },
    Branch { child: u64 },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A page's bytes (with its overflow) and its header.
struct Page {
    id: u64,
    flags: u16,
    count: usize,
    bytes: Vec<u8>,
}

impl Page {
    /// Parses the header of `bytes` (at least [`HEADER`] long: the caller's proof).
    fn new(id: u64, bytes: Vec<u8>) -> Page {
        Page { id, flags: u16_at(&bytes, 8), count: usize::from(u16_at(&bytes, 10)), bytes }
    }

    /// Element `i`, every offset checked against the page's bytes.
    fn element(&self, i: usize) -> Result<Element<'_>, ReadError> {
        let b = &self.bytes;
        let at = HEADER + ELEMENT * i;
        if at + ELEMENT > b.len() {
            return Err(page_err(
                self.id,
                format!("{} elements do not fit in {} bytes", self.count, b.len()),
            ));
        }
        let slice = |pos: u32, len: u32| {
            let start = at.checked_add(pos as usize);
            let end = start.and_then(|s| s.checked_add(len as usize));
            match (start, end) {
                (Some(s), Some(e)) if e <= b.len() => Ok(&b[s..e]),
                _ => Err(page_err(self.id, format!("element {i} points outside the page"))),
            }
        };
        if self.flags & LEAF != 0 {
            let (flags, pos, ksize, vsize) =
                (u32_at(b, at), u32_at(b, at + 4), u32_at(b, at + 8), u32_at(b, at + 12));
            let key = slice(pos, ksize)?;
            let value = slice(
                pos.checked_add(ksize).ok_or_else(|| page_err(self.id, "element size overflows"))?,
                vsize,
            )?;
            Ok(Element::Leaf { flags, key, value })
        } else {
            let (pos, ksize, child) = (u32_at(b, at), u32_at(b, at + 4), u64_at(b, at + 8));
            slice(pos, ksize)?;
            Ok(Element::Branch { child })
        }
    }
}

/// A bbolt database file opened for reading.
pub struct DbReader {
    file: File,
    meta: Meta,
}

/// Which pages a walk has visited: one bit per page under the high-water mark.
pub struct Visited(Vec<u64>);

impl Visited {
    fn new(pages: u64) -> Visited {
        Visited(vec![0; pages.div_ceil(64) as usize])
    }

    /// Marks `id`; false if it was marked already.
    fn mark(&mut self, id: u64) -> bool {
        let (word, bit) = ((id / 64) as usize, 1u64 << (id % 64));
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }

    fn has(&self, id: u64) -> bool {
        self.0[(id / 64) as usize] & (1u64 << (id % 64)) != 0
    }
}

/// Parses and validates the meta in `page` (a meta page's first bytes).
fn parse_meta(page: &[u8]) -> Result<Meta, String> {
    let m = &page[HEADER..HEADER + META_BYTES];
    if u16_at(page, 8) & META == 0 {
        return Err("not a meta page".into());
    }
    if u32_at(m, 0) != MAGIC {
        return Err("bad magic".into());
    }
    if u32_at(m, 4) != VERSION {
        return Err(format!("version {} (2 is known)", u32_at(m, 4)));
    }
    if fnv1a64(&m[..56]) != u64_at(m, 56) {
        return Err("checksum mismatch".into());
    }
    let page_size = u64::from(u32_at(m, 8));
    if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
        return Err(format!("page size {page_size}"));
    }
    Ok(Meta {
        page_size,
        root: u64_at(m, 16),
        freelist: u64_at(m, 32),
        pages: u64_at(m, 40),
        txid: u64_at(m, 48),
    })
}

impl DbReader {
    /// Opens the first `len` bytes of `file` (a backup's trailer excluded) as a database: a valid
    /// meta page (the one with the higher txid if both are), whose pages the file holds.
    pub fn open(file: File, len: u64) -> Result<DbReader, ReadError> {
        if len < 2 * 512 {
            return Err(ReadError::TooShort(len));
        }
        let mut first = vec![0u8; HEADER + META_BYTES];
        file.read_exact_at(&mut first, 0)?;
        let m0 = parse_meta(&first);
        // The second meta is one page on: bbolt takes the page size from the first meta if it
        // is valid, else tries its own (4096).
        let size1 = m0.as_ref().map_or(PAGE_SIZE as u64, |m| m.page_size);
        let m1 = if len >= 2 * size1 {
            let mut second = vec![0u8; HEADER + META_BYTES];
            file.read_exact_at(&mut second, size1)?;
            parse_meta(&second)
        } else {
            Err("beyond the end of the file".into())
        };
        let meta = match (m0, m1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid && b.page_size == a.page_size {
                    b
                } else {
                    a
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(a), Err(b)) => return Err(ReadError::NoMeta(format!("page 0: {a}; page 1: {b}"))),
        };
        if meta.pages < 2 || meta.pages.checked_mul(meta.page_size).is_none_or(|bytes| bytes > len) {
            return Err(ReadError::Truncated { pages: meta.pages, page_size: meta.page_size, len });
        }
        if meta.root < 2 || meta.root >= meta.pages {
            return Err(page_err(
                meta.root,
                format!("the root bucket is outside the file's {} pages", meta.pages),
            ));
        }
        if meta.freelist != NO_FREELIST && (meta.freelist < 2 || meta.freelist >= meta.pages) {
            return Err(page_err(meta.freelist, "the freelist is outside the file"));
        }
        Ok(DbReader { file, meta })
    }

    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// Page `id` with its overflow, every bound checked.
    fn page(&self, id: u64) -> Result<Page, ReadError> {
        let ps = self.meta.page_size;
        if id < 2 || id >= self.meta.pages {
            return Err(page_err(id, format!("outside the file's {} pages", self.meta.pages)));
        }
        let mut header = [0u8; HEADER];
        self.file.read_exact_at(&mut header, id * ps)?;
        if u64_at(&header, 0) != id {
            return Err(page_err(id, format!("its header says page {}", u64_at(&header, 0))));
        }
        let overflow = u64::from(u32_at(&header, 12));
        if id + overflow >= self.meta.pages {
            return Err(page_err(
                id,
                format!("{overflow} overflow pages run past the file's {} pages", self.meta.pages),
            ));
        }
        // Bounded: the pages are in the file (checked at open).
        let mut bytes = vec![0u8; ((overflow + 1) * ps) as usize];
        self.file.read_exact_at(&mut bytes, id * ps)?;
        Ok(Page::new(id, bytes))
    }

    /// The root bucket (whose entries are the top-level buckets).
    pub fn root(&self) -> Bucket {
        Bucket::Page(self.meta.root)
    }

    /// The top-level bucket `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket>, ReadError> {
        let mut found = None;
        self.for_each(&self.root(), &mut |k, v, is_bucket| {
            if is_bucket && k == name {
                found = Some(Bucket::parse(v)?);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Calls `visit(key, value, is_bucket)` for every element of `bucket` in key order (keys
    /// checked to ascend), and answers how many there were.
    pub fn for_each(&self, bucket: &Bucket, visit: &mut Visit<'_>) -> Result<u64, ReadError> {
        let mut visited = Visited::new(self.meta.pages);
        self.walk(bucket, &mut visited, &mut |_| Ok(()), visit)
    }

    /// Walks `bucket`'s pages (each marked in `visited`, `on_page(id)` called for each, overflow
    /// included) and its elements in order.
    fn walk(
        &self,
        bucket: &Bucket,
        visited: &mut Visited,
        on_page: &mut dyn FnMut(u64) -> Result<(), ReadError>,
        visit: &mut Visit<'_>,
    ) -> Result<u64, ReadError> {
        let mut last: Option<Vec<u8>> = None;
        let mut count = 0;
        match bucket {
            Bucket::Page(id) => self.walk_page(*id, 0, visited, on_page, &mut last, &mut count, visit)?,
            Bucket::Inline(bytes) => {
                if bytes.len() < HEADER {
                    return Err(page_err(0, "an inline bucket shorter than a page header"));
                }
                let page = Page::new(0, bytes.clone());
                if page.flags & LEAF == 0 {
                    return Err(page_err(0, "an inline bucket that is not a leaf"));
                }
                self.visit_leaf(&page, &mut last, &mut count, visit)?;
            }
        }
        Ok(count)
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_page(
        &self,
        id: u64,
        depth: usize,
        visited: &mut Visited,
        on_page: &mut dyn FnMut(u64) -> Result<(), ReadError>,
        last: &mut Option<Vec<u8>>,
        count: &mut u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), ReadError> {
        if depth > MAX_DEPTH {
            return Err(ReadError::TooDeep(id));
        }
        let page = self.page(id)?;
        let overflow = (page.bytes.len() as u64 / self.meta.page_size) - 1;
        for p in id..=id + overflow {
            if !visited.mark(p) {
                return Err(ReadError::Revisited(p));
            }
            on_page(p)?;
        }
        if page.flags & LEAF != 0 {
            return self.visit_leaf(&page, last, count, visit);
        }
        if page.flags & BRANCH == 0 {
            return Err(page_err(id, format!("flags {:#x}: neither a branch nor a leaf", page.flags)));
        }
        for i in 0..page.count {
            let Element::Branch { child } = page.element(i)? else {
                return Err(page_err(id, "a leaf element on a branch page"));
            };
            self.walk_page(child, depth + 1, visited, on_page, last, count, visit)?;
        }
        Ok(())
    }

    fn visit_leaf(
        &self,
        page: &Page,
        last: &mut Option<Vec<u8>>,
        count: &mut u64,
        visit: &mut Visit<'_>,
    ) -> Result<(), ReadError> {
        for i in 0..page.count {
            let Element::Leaf { flags, key, value } = page.element(i)? else {
                return Err(page_err(page.id, "a branch element on a leaf page"));
            };
            if let Some(l) = last.as_deref() {
                if key <= l {
                    return Err(ReadError::KeyOrder { key: lossy(key), after: lossy(l) });
                }
            }
            *last = Some(key.to_vec());
            *count += 1;
            visit(key, value, flags & BUCKET_LEAF != 0)?;
        }
        Ok(())
    }

    /// bbolt's `tx.Check()`, as far as a file can be judged: every bucket's pages are in range,
    /// branch or leaf, reached once, their keys ascending; the freelist's pages are in range, not
    /// freed twice and not reachable; every page under the high-water mark is reachable or free.
    /// Answers the number of buckets and of keys in them.
    pub fn check(&self) -> Result<CheckStats, ReadError> {
        let pages = self.meta.pages;
        let mut reachable = Visited::new(pages);
        reachable.mark(0);
        reachable.mark(1);
        let mut freed = Visited::new(pages);
        if self.meta.freelist != NO_FREELIST {
            let page = self.page(self.meta.freelist)?;
            if page.flags & FREELIST == 0 {
                return Err(page_err(page.id, "the meta's freelist is not a freelist page"));
            }
            let overflow = page.bytes.len() as u64 / self.meta.page_size - 1;
            for p in page.id..=page.id + overflow {
                reachable.mark(p);
            }
            let (mut at, mut count) = (HEADER, page.count as u64);
            if page.count == 0xFFFF {
                count = page.bytes.get(HEADER..HEADER + 8).map_or(u64::MAX, |b| u64_at(b, 0));
                at += 8;
            }
            if count > (page.bytes.len() - at) as u64 / 8 {
                return Err(page_err(page.id, format!("{count} free pages do not fit in the freelist page")));
            }
            for i in 0..count as usize {
                let free = u64_at(&page.bytes, at + 8 * i);
                if free < 2 || free >= pages {
                    return Err(ReadError::Check(format!("free page {free} is outside the file")));
                }
                if !freed.mark(free) {
                    return Err(ReadError::Check(format!("page {free}: already freed")));
                }
            }
        }
        let mut stats = CheckStats::default();
        self.check_bucket(&self.root(), 0, &mut reachable, &freed, &mut stats)?;
        for p in 0..pages {
            let free = self.meta.freelist == NO_FREELIST || freed.has(p);
            if !reachable.has(p) && !free {
                return Err(ReadError::Check(format!("page {p}: unreachable unfreed")));
            }
        }
        Ok(stats)
    }

    fn check_bucket(
        &self,
        bucket: &Bucket,
        nesting: usize,
        reachable: &mut Visited,
        freed: &Visited,
        stats: &mut CheckStats,
    ) -> Result<(), ReadError> {
        if nesting > MAX_NESTING {
            return Err(ReadError::TooNested);
        }
        let mut children = Vec::new();
        let mut on_page = |p: u64| {
            if freed.has(p) {
                return Err(ReadError::Check(format!("page {p}: reachable freed")));
            }
            Ok(())
        };
        // Reached twice across buckets is caught by the shared `reachable` set.
        self.walk(bucket, reachable, &mut on_page, &mut |_, v, is_bucket| {
            if is_bucket {
                children.push(Bucket::parse(v)?);
            } else {
                stats.keys += 1;
            }
            Ok(())
        })?;
        for child in children {
            stats.buckets += 1;
            self.check_bucket(&child, nesting + 1, reachable, freed, stats)?;
        }
        Ok(())
    }
}

/// What [`DbReader::check`] counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckStats {
    pub buckets: u64,
    pub keys: u64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::Rng;
    use rand::SeedableRng;

    use super::*;

    type Buckets = BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>;

    /// Writes `buckets` in two passes, as the snapshot stream does; answers the file's bytes.
    fn write(buckets: &Buckets) -> Vec<u8> {
        let pass = |layout| {
            let mut w = DbWriter::new(Vec::new(), layout).expect("new");
            for (name, rows) in buckets {
                w.begin_bucket(name).expect("bucket");
                for (k, v) in rows {
                    w.put(k, v).expect("put");
                }
            }
            w.finish().expect("finish")
        };
        let (layout, first) = pass(None);
        let (again, bytes) = pass(Some(layout));
        assert_eq!(layout, again);
        assert_eq!(first.len(), bytes.len());
        assert_eq!(layout.bytes(), bytes.len() as u64);
        bytes
    }

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(bytes).expect("write");
        (f, bytes.len() as u64)
    }

    fn open(bytes: &[u8]) -> Result<DbReader, ReadError> {
        let (f, len) = file_of(bytes);
        DbReader::open(f.reopen().expect("reopen"), len)
    }

    /// Everything a database holds, read back through its root.
    fn read_all(db: &DbReader) -> Result<Buckets, ReadError> {
        let mut names = Vec::new();
        db.for_each(&db.root(), &mut |k, v, is_bucket| {
            if !is_bucket {
                return Err(ReadError::Check("a plain key at the top (damaged flags)".into()));
            }
            names.push((k.to_vec(), Bucket::parse(v)?));
            Ok(())
        })?;
        let mut out = Buckets::new();
        for (name, bucket) in names {
            let mut rows = BTreeMap::new();
            db.for_each(&bucket, &mut |k, v, _| {
                rows.insert(k.to_vec(), v.to_vec());
                Ok(())
            })?;
            out.insert(name, rows);
        }
        Ok(out)
    }

    fn random_buckets(rng: &mut rand::rngs::StdRng) -> Buckets {
        let mut buckets = Buckets::new();
        for b in 0..rng.gen_range(0..6) {
            let mut rows = BTreeMap::new();
            let n = [0, 1, 10, 500, 5000][rng.gen_range(0..5)];
            for _ in 0..n {
                let key: Vec<u8> = (0..rng.gen_range(1..40)).map(|_| rng.gen()).collect();
                let vlen =
                    if rng.gen_ratio(1, 200) { rng.gen_range(4000..20000) } else { rng.gen_range(0..100) };
                rows.insert(key, vec![rng.gen(); vlen]);
            }
            buckets.insert(format!("bucket{b}").into_bytes(), rows);
        }
        buckets
    }

    #[test]
    fn written_databases_read_back_whole_and_pass_the_check() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..8 {
            let buckets = random_buckets(&mut rng);
            let bytes = write(&buckets);
            let db = open(&bytes).expect("open");
            let stats = db.check().expect("check");
            assert_eq!(buckets.len() as u64, stats.buckets);
            assert_eq!(buckets.values().map(|r| r.len() as u64).sum::<u64>(), stats.keys);
            assert_eq!(buckets, read_all(&db).expect("read"));
        }
    }

    #[test]
    fn a_large_bucket_gets_branch_pages_and_a_huge_value_overflow_pages() {
        let mut rows = BTreeMap::new();
        for i in 0..100_000u32 {
            rows.insert(i.to_be_bytes().to_vec(), i.to_le_bytes().to_vec());
        }
        rows.insert(b"zz".to_vec(), vec![7u8; 3 * PAGE_SIZE + 5]);
        let buckets = Buckets::from([(b"key".to_vec(), rows)]);
        let bytes = write(&buckets);
        let db = open(&bytes).expect("open");
        db.check().expect("check");
        assert_eq!(buckets, read_all(&db).expect("read"));
        // Root bucket → key bucket root: a branch page above branch pages above leaves.
        let Some(Bucket::Page(root)) = db.bucket(b"key").expect("bucket") else { panic!("no key bucket") };
        let page = db.page(root).expect("page");
        assert_eq!(BRANCH, page.flags);
    }

    #[test]
    fn keys_and_buckets_out_of_order_are_refused() {
        let mut w = DbWriter::new(Vec::new(), None).expect("new");
        assert!(matches!(w.put(b"a", b""), Err(WriteError::NoBucket { .. })));
        w.begin_bucket(b"b").expect("bucket");
        w.put(b"b", b"").expect("put");
        assert!(matches!(w.put(b"b", b""), Err(WriteError::KeyOrder { .. })));
        assert!(matches!(w.put(b"a", b""), Err(WriteError::KeyOrder { .. })));
        assert!(matches!(w.begin_bucket(b"a"), Err(WriteError::BucketOrder { .. })));
    }

    #[test]
    fn a_second_pass_that_differs_is_reported() {
        let (layout, _) = DbWriter::new(Vec::new(), None).expect("new").finish().expect("finish");
        let mut w = DbWriter::new(Vec::new(), Some(layout)).expect("new");
        w.begin_bucket(b"x").expect("bucket");
        assert!(matches!(w.finish(), Err(WriteError::LayoutChanged { .. })));
    }

    fn sample() -> Vec<u8> {
        let mut rows = BTreeMap::new();
        for i in 0..3000u32 {
            rows.insert(format!("k{i:05}").into_bytes(), vec![b'v'; (i % 50) as usize]);
        }
        rows.insert(b"zbig".to_vec(), vec![1; 9000]);
        write(&Buckets::from([(b"a".to_vec(), rows.clone()), (b"b".to_vec(), rows)]))
    }

    /// Reads everything a (possibly damaged) file lets through; must end, and never panic.
    fn try_everything(bytes: &[u8]) {
        if let Ok(db) = open(bytes) {
            let _ = db.check();
            let _ = read_all(&db);
        }
    }

    #[test]
    fn truncated_files_are_errors() {
        let bytes = sample();
        for len in [0, 100, PAGE_SIZE, 2 * PAGE_SIZE + 10, bytes.len() / 2, bytes.len() - 1] {
            let err = match open(&bytes[..len]) {
                Err(e) => e,
                Ok(db) => db.check().expect_err("a truncated file must not check"),
            };
            let _ = err.to_string();
        }
    }

    #[test]
    fn flipped_bytes_never_panic_and_never_loop() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let bytes = sample();
        for _ in 0..300 {
            let mut damaged = bytes.clone();
            for _ in 0..rng.gen_range(1..8) {
                let at = rng.gen_range(0..damaged.len());
                damaged[at] = rng.gen();
            }
            try_everything(&damaged);
        }
        // Damage aimed at page headers and element arrays: ids, flags, counts, overflow, offsets.
        let pages = bytes.len() / PAGE_SIZE;
        for _ in 0..300 {
            let mut damaged = bytes.clone();
            let page = rng.gen_range(2..pages);
            let at = page * PAGE_SIZE + rng.gen_range(0..64);
            damaged[at] = rng.gen();
            try_everything(&damaged);
        }
    }

    /// Rewrites page `id`'s header in `bytes`.
    fn set_header(bytes: &mut [u8], id: u64, flags: u16, count: u16, overflow: u32) {
        let at = id as usize * PAGE_SIZE;
        page_header(&mut bytes[at..at + HEADER], id, flags, count, overflow);
    }

    fn root_of(bytes: &[u8]) -> u64 {
        open(bytes).expect("open").meta().root
    }

    #[test]
    fn hostile_pages_are_named_errors() {
        let bytes = sample();
        let root = root_of(&bytes);
        // The root bucket's leaf pointing bucket "a" at itself: reached twice.
        let mut cyclic = bytes.clone();
        let at = root as usize * PAGE_SIZE + HEADER; // element 0
        let pos = u32_at(&cyclic, at + 4) as usize;
        let value = at + pos + 1; // key "a", then the bucket value
        cyclic[value..value + 8].copy_from_slice(&root.to_le_bytes());
        let db = open(&cyclic).expect("open");
        assert!(matches!(db.check(), Err(ReadError::Revisited(_))), "{:?}", db.check());
        // A branch page whose child is itself.
        let Some(Bucket::Page(a)) = open(&bytes).expect("open").bucket(b"a").expect("a") else { panic!() };
        let mut self_loop = bytes.clone();
        let child = a as usize * PAGE_SIZE + HEADER + 8;
        self_loop[child..child + 8].copy_from_slice(&a.to_le_bytes());
        assert!(matches!(read_all(&open(&self_loop).expect("open")), Err(ReadError::Revisited(_))));
        // A child past the high-water mark.
        let mut far = bytes.clone();
        far[child..child + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read_all(&open(&far).expect("open")), Err(ReadError::Page { .. })));
        // Overflow past the end, a huge count, a header naming another page, a bad type.
        for (flags, count, overflow, id_shift) in
            [(BRANCH, 1, u32::MAX, 0), (BRANCH, u16::MAX, 0, 0), (BRANCH, 1, 0, 1), (0x40, 1, 0, 0)]
        {
            let mut bad = bytes.clone();
            set_header(&mut bad, a, flags, count, overflow);
            if id_shift > 0 {
                bad[a as usize * PAGE_SIZE..a as usize * PAGE_SIZE + 8]
                    .copy_from_slice(&(a + 1).to_le_bytes());
            }
            assert!(matches!(read_all(&open(&bad).expect("open")), Err(ReadError::Page { .. })));
        }
    }

    #[test]
    fn damaged_meta_pages_fall_back_or_fail() {
        let bytes = sample();
        // Page 1 (the current meta) damaged: page 0 still opens the same database.
        let mut one = bytes.clone();
        one[PAGE_SIZE + HEADER + 20] ^= 1;
        assert_eq!(
            read_all(&open(&bytes).expect("open")).expect("read"),
            read_all(&open(&one).expect("open")).expect("read")
        );
        let mut both = one.clone();
        both[HEADER + 20] ^= 1;
        assert!(matches!(open(&both), Err(ReadError::NoMeta(_))));
        // A meta claiming more pages than the file holds.
        let mut long = bytes.clone();
        for id in 0..2 {
            let meta = meta_page(id, Layout { root: root_of(&bytes), pages: 1 << 40 });
            long[id as usize * PAGE_SIZE..(id as usize + 1) * PAGE_SIZE].copy_from_slice(&meta);
        }
        assert!(matches!(open(&long), Err(ReadError::Truncated { .. })));
    }

    #[test]
    fn an_unreachable_page_fails_the_check() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0u8; PAGE_SIZE]);
        let root = root_of(&bytes);
        let pages = (bytes.len() / PAGE_SIZE) as u64;
        for id in 0..2 {
            let meta = meta_page(id, Layout { root, pages });
            bytes[id as usize * PAGE_SIZE..(id as usize + 1) * PAGE_SIZE].copy_from_slice(&meta);
        }
        let err = open(&bytes).expect("open").check().expect_err("a gap");
        assert!(err.to_string().contains("unreachable unfreed"), "{err}");
    }
}
