//! Tar streams for tests of layer unpacking, written as given: names the tar crate
//! would refuse (`..`, absolute paths), any mode, owner and device numbers, and PAX
//! extended attributes. The storage service's unit tests and the integration tests'
//! hostile images both build their layers here.
#![deny(unsafe_code)]

/// One entry of a test archive.
#[derive(Clone, Debug)]
pub struct RawEntry {
    pub kind: tar::EntryType,
    pub name: String,
    pub link: Option<String>,
    pub data: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub device: Option<(u32, u32)>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl RawEntry {
    /// An entry owned by root, 0755 for a directory and 0644 otherwise.
    pub fn new(kind: tar::EntryType, name: &str) -> RawEntry {
        let mode = if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        };
        RawEntry {
            kind,
            name: name.to_string(),
            link: None,
            data: Vec::new(),
            mode,
            uid: 0,
            device: None,
            xattrs: Vec::new(),
        }
    }

    pub fn link(mut self, target: &str) -> RawEntry {
        self.link = Some(target.to_string());
        self
    }

    pub fn data(mut self, data: &[u8]) -> RawEntry {
        self.data = data.to_vec();
        self
    }

    pub fn mode(mut self, mode: u32) -> RawEntry {
        self.mode = mode;
        self
    }

    pub fn uid(mut self, uid: u64) -> RawEntry {
        self.uid = uid;
        self
    }

    pub fn device(mut self, major: u32, minor: u32) -> RawEntry {
        self.device = Some((major, minor));
        self
    }

    pub fn xattr(mut self, name: &str, value: &[u8]) -> RawEntry {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
}

/// A PAX record: "<length> <key>=<value>\n", the length counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3;
    let mut length = body_len + 1;
    while format!("{length}").len() + body_len != length {
        length += 1;
    }
    let mut record = format!("{length} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// A GNU header of root's, dated 2023-11-14.
pub fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header
}

/// Appends an entry with its raw name bytes (names up to 99 bytes), preceded by a PAX
/// header when it has attributes.
pub fn append(builder: &mut tar::Builder<Vec<u8>>, entry: &RawEntry) -> std::io::Result<()> {
    if !entry.xattrs.is_empty() {
        let records: Vec<u8> = entry
            .xattrs
            .iter()
            .flat_map(|(key, value)| pax_record(&format!("SCHILY.xattr.{key}"), value))
            .collect();
        let mut pax = header(tar::EntryType::XHeader, records.len() as u64, 0o644);
        pax.set_path("PaxHeaders/entry")?;
        pax.set_cksum();
        builder.append(&pax, records.as_slice())?;
    }
    let mut header = header(entry.kind, entry.data.len() as u64, entry.mode);
    header.set_uid(entry.uid);
    if let Some((major, minor)) = entry.device {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    let too_long = |what: &str| {
        std::io::Error::other(format!("{what} of a raw entry must stay under 100 bytes"))
    };
    let gnu = header
        .as_gnu_mut()
        .ok_or_else(|| std::io::Error::other("not a GNU header"))?;
    gnu.name
        .get_mut(..entry.name.len())
        .filter(|_| entry.name.len() < 100)
        .ok_or_else(|| too_long("the name"))?
        .copy_from_slice(entry.name.as_bytes());
    if let Some(link) = &entry.link {
        gnu.linkname
            .get_mut(..link.len())
            .filter(|_| link.len() < 100)
            .ok_or_else(|| too_long("the link"))?
            .copy_from_slice(link.as_bytes());
    }
    header.set_cksum();
    builder.append(&header, entry.data.as_slice())
}

/// The whole tar stream of `entries`.
pub fn tar_of(entries: &[RawEntry]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        append(&mut builder, entry)?;
    }
    builder.into_inner()
}
