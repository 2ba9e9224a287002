//! The EROFS on-disk structures hoist writes, as the kernel reads them
//! (`fs/erofs/erofs_fs.h`): constants and little-endian encoders, nothing
//! else. Only the subset a tar index image needs is here: 512-byte blocks,
//! extended inodes, inline xattrs, flat and chunk-based data, one extra
//! device.

/// Block size: 512 bytes, so tar offsets (512-aligned) are block addresses.
pub const BLOCK_BITS: u8 = 9;
pub const BLOCK_SIZE: u64 = 1 << BLOCK_BITS;

/// The superblock's byte offset (the first KiB is left for boot sectors).
pub const SUPER_OFFSET: u64 = 1024;
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// The superblock without extension slots (`sb_extslots` = 0).
pub const SUPER_SIZE: usize = 128;

pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;

pub const DEVICE_SLOT_SIZE: usize = 128;

/// Inode slots: a nid counts 32-byte units from `meta_blkaddr`.
pub const INODE_SLOT_BITS: u32 = 5;
pub const INODE_SLOT: u64 = 1 << INODE_SLOT_BITS;
pub const EXTENDED_INODE_SIZE: usize = 64;

pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
/// `e_value_size` is 16 bits.
pub const XATTR_VALUE_MAX: usize = u16::MAX as usize;

pub const CHUNK_INDEX_SIZE: usize = 8;
/// The chunk format keeps `chunk size / block size` as 5 bits of log2.
pub const CHUNK_BLKBITS_MAX: u8 = 0x1f;
const CHUNK_FORMAT_INDEXES: u16 = 0x0020;
/// A chunk that is a hole (`EROFS_NULL_ADDR` truncated to 32 bits).
pub const NULL_ADDR: u32 = u32::MAX;

pub const DIRENT_SIZE: usize = 12;
pub const NAME_LEN_MAX: usize = 255;

/// `i_format`'s data layouts (bits 1-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLayout {
    /// Data in consecutive blocks from `startblk`.
    FlatPlain = 0,
    /// Whole blocks from `startblk`, the tail right after the inode.
    FlatInline = 2,
    /// Chunk indexes after the inode, each naming a device and a block.
    ChunkBased = 4,
}

/// EROFS file types of directory entries (the kernel's `FT_*`).
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

/// The dirent type of an `st_mode`, `None` for an unknown type.
pub fn file_type(mode: u32) -> Option<u8> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG => FT_REG_FILE,
        libc::S_IFDIR => FT_DIR,
        libc::S_IFCHR => FT_CHRDEV,
        libc::S_IFBLK => FT_BLKDEV,
        libc::S_IFIFO => FT_FIFO,
        libc::S_IFSOCK => FT_SOCK,
        libc::S_IFLNK => FT_SYMLINK,
        _ => return None,
    })
}

/// The fields of the superblock hoist sets; the rest stay zero (no
/// checksum, no compression, no shared xattrs, no long xattr prefixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperBlock {
    pub root_nid: u16,
    pub inos: u64,
    /// Base time of compact inodes; informational here (all inodes are
    /// extended and carry their own times).
    pub epoch: u64,
    /// Blocks of the image itself (statfs).
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub uuid: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    /// The device table's byte offset divided by [`DEVICE_SLOT_SIZE`].
    pub devt_slotoff: u16,
}

impl SuperBlock {
    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, SUPER_MAGIC);
        // 4: checksum, 8: feature_compat — both zero.
        b[12] = BLOCK_BITS;
        // 13: sb_extslots = 0.
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.epoch);
        // 32: fixed_nsec = 0.
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        // 44: xattr_blkaddr = 0 (no shared xattrs).
        b[48..64].copy_from_slice(&self.uuid);
        // 64: volume_name, empty.
        put32(&mut b, 80, self.feature_incompat);
        // 84: available_compr_algs = 0.
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        // 90: dirblkbits = 0 (the kernel refuses anything else).
        b
    }
}

/// One entry of the device table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// A name or digest; unused when the mount names the device.
    pub tag: [u8; 64],
    pub blocks: u32,
    /// Where the device starts in a flat (single-device) address space; 0
    /// keeps the kernel from ever redirecting primary-device addresses.
    pub mapped_blkaddr: u32,
}

impl DeviceSlot {
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[..64].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.mapped_blkaddr);
        b
    }
}

/// A 64-byte inode: 32-bit ids, 64-bit size, its own mtime in ns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendedInode {
    pub layout: DataLayout,
    pub xattr_icount: u16,
    pub mode: u16,
    pub size: u64,
    /// `startblk` (flat), `rdev` (devices) or the chunk format.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
}

impl ExtendedInode {
    pub fn encode(&self) -> [u8; EXTENDED_INODE_SIZE] {
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        // Bit 0: extended; bits 1-3: data layout.
        put16(&mut b, 0, 1 | ((self.layout as u16) << 1));
        put16(&mut b, 2, self.xattr_icount);
        put16(&mut b, 4, self.mode);
        // 6: i_nb stays zero: the kernel reads it as the high 16 bits of
        // `startblk` of extended inodes.
        put64(&mut b, 8, self.size);
        put32(&mut b, 16, self.i_u);
        put32(&mut b, 20, self.ino);
        put32(&mut b, 24, self.uid);
        put32(&mut b, 28, self.gid);
        put64(&mut b, 32, self.mtime as u64);
        put32(&mut b, 40, self.mtime_nsec);
        put32(&mut b, 44, self.nlink);
        b
    }
}

/// `i_u` of a chunk-based inode: 8-byte chunk indexes, chunks of
/// `BLOCK_SIZE << blkbits` bytes.
pub fn chunk_format(blkbits: u8) -> u32 {
    u32::from(CHUNK_FORMAT_INDEXES | (u16::from(blkbits) & u16::from(CHUNK_BLKBITS_MAX)))
}

/// One chunk index: the device (0 = the image, 1 = the first extra
/// device) and the chunk's first block, or [`NULL_ADDR`] for a hole.
pub fn chunk_index(device_id: u16, blkaddr: u32) -> [u8; CHUNK_INDEX_SIZE] {
    let mut b = [0u8; CHUNK_INDEX_SIZE];
    // 0: startblk_hi, only read with the 48-bit feature.
    put16(&mut b, 2, device_id);
    put32(&mut b, 4, blkaddr);
    b
}

/// One directory entry; `nameoff` is the name's offset in its block.
pub fn dirent(nid: u64, nameoff: u16, file_type: u8) -> [u8; DIRENT_SIZE] {
    let mut b = [0u8; DIRENT_SIZE];
    put64(&mut b, 0, nid);
    put16(&mut b, 8, nameoff);
    b[10] = file_type;
    b
}

/// A device number as the kernel's `new_decode_dev` reads it: 12 bits of
/// major, 20 of minor (the kernel's own limits), or `None` beyond them.
pub fn encode_rdev(major: u32, minor: u32) -> Option<u32> {
    if major > 0xfff || minor > 0xf_ffff {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// The name index of a full xattr name and the rest of the name, or `None`
/// when no index the kernel reads covers it. The POSIX ACLs are whole
/// names with an empty rest; the other prefixes need a non-empty rest (the
/// VFS has no attribute named by a bare prefix).
pub fn xattr_name_index(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, b"")),
        b"system.posix_acl_default" => return Some((3, b"")),
        _ => {}
    }
    const PREFIXES: [(&[u8], u8); 3] = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];
    PREFIXES.iter().find_map(|(prefix, index)| {
        name.strip_prefix(*prefix)
            .filter(|rest| !rest.is_empty())
            .map(|rest| (*index, rest))
    })
}

/// Bytes of one inline xattr entry: header, name rest and value, padded
/// to 4 as the kernel steps over them.
pub fn xattr_entry_size(rest_len: usize, value_len: usize) -> usize {
    (XATTR_ENTRY_HEADER_SIZE + rest_len + value_len).next_multiple_of(4)
}

/// `i_xattr_icount` for an inline xattr body of `ibody_size` bytes (the
/// 12-byte header plus entries, a multiple of 4): the kernel reads the
/// size back as `12 + 4 * (icount - 1)`. `None` when it overflows 16 bits.
pub fn xattr_icount(ibody_size: usize) -> Option<u16> {
    if ibody_size == 0 {
        return Some(0);
    }
    debug_assert!(ibody_size > XATTR_IBODY_HEADER_SIZE && ibody_size.is_multiple_of(4));
    u16::try_from((ibody_size - XATTR_IBODY_HEADER_SIZE) / 4 + 1).ok()
}

/// The inline xattr body header: no name filter (the superblock does not
/// enable it, so the kernel ignores the field), no shared xattrs.
pub fn xattr_ibody_header() -> [u8; XATTR_IBODY_HEADER_SIZE] {
    [0u8; XATTR_IBODY_HEADER_SIZE]
}

/// An xattr entry's header; the name rest and the value follow.
pub fn xattr_entry_header(rest_len: u8, index: u8, value_len: u16) -> [u8; 4] {
    let v = value_len.to_le_bytes();
    [rest_len, index, v[0], v[1]]
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_round_trips_through_the_kernel_decoding() {
        // The kernel's new_decode_dev.
        let decode = |dev: u32| ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00));
        for (major, minor) in [(0, 0), (1, 3), (8, 1), (259, 300_000), (0xfff, 0xf_ffff)] {
            let dev = encode_rdev(major, minor).unwrap();
            assert_eq!(decode(dev), (major, minor));
        }
        assert_eq!(encode_rdev(0x1000, 0), None);
        assert_eq!(encode_rdev(0, 0x10_0000), None);
    }

    #[test]
    fn xattr_names_map_to_the_kernel_indexes() {
        assert_eq!(xattr_name_index(b"user.x"), Some((1, &b"x"[..])));
        assert_eq!(
            xattr_name_index(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(
            xattr_name_index(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(
            xattr_name_index(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(
            xattr_name_index(b"system.posix_acl_default"),
            Some((3, &b""[..]))
        );
        for bad in [
            &b"user."[..],
            b"system.posix_acl_accessx",
            b"system.foo",
            b"lustre.x",
            b"x",
            b"",
        ] {
            assert_eq!(
                xattr_name_index(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn xattr_sizes_match_the_kernel_formula() {
        assert_eq!(xattr_entry_size(1, 0), 8);
        assert_eq!(xattr_entry_size(0, 0), 4);
        assert_eq!(xattr_entry_size(3, 1), 8);
        assert_eq!(xattr_entry_size(4, 1), 12);
        // The kernel's erofs_xattr_ibody_size(icount) = 12 + 4 * (icount - 1).
        for body in [16usize, 20, 12 + 8 + 12, 12 + 65_540] {
            let icount = xattr_icount(body).unwrap();
            assert_eq!(12 + 4 * (usize::from(icount) - 1), body);
        }
        assert_eq!(xattr_icount(0), Some(0));
        assert_eq!(xattr_icount(12 + 4 * 65_534), Some(u16::MAX));
        assert_eq!(xattr_icount(12 + 4 * 65_535), None);
    }

    #[test]
    fn superblock_fields_sit_at_their_offsets() {
        let sb = SuperBlock {
            root_nid: 40,
            inos: 7,
            epoch: 1_700_000_000,
            blocks: 9,
            meta_blkaddr: 0,
            uuid: [0xab; 16],
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE,
            extra_devices: 1,
            devt_slotoff: 9,
        }
        .encode();
        assert_eq!(&sb[0..4], &0xE0F5_E1E2u32.to_le_bytes());
        assert_eq!(sb[12], 9);
        assert_eq!(&sb[14..16], &40u16.to_le_bytes());
        assert_eq!(&sb[16..24], &7u64.to_le_bytes());
        assert_eq!(&sb[36..40], &9u32.to_le_bytes());
        assert_eq!(&sb[48..64], &[0xab; 16]);
        assert_eq!(&sb[80..84], &12u32.to_le_bytes());
        assert_eq!(&sb[86..88], &1u16.to_le_bytes());
        assert_eq!(&sb[88..90], &9u16.to_le_bytes());
        assert_eq!(sb[90], 0);
    }

    #[test]
    fn inode_and_index_encodings() {
        let inode = ExtendedInode {
            layout: DataLayout::ChunkBased,
            xattr_icount: 3,
            mode: 0o100644,
            size: 1 << 33,
            i_u: chunk_format(24),
            ino: 5,
            uid: 70_000,
            gid: 80_000,
            mtime: -1,
            mtime_nsec: 999_999_999,
            nlink: 2,
        }
        .encode();
        assert_eq!(&inode[0..2], &9u16.to_le_bytes());
        assert_eq!(&inode[6..8], &[0, 0]);
        assert_eq!(&inode[16..18], &(0x20u16 | 24).to_le_bytes());
        assert_eq!(&inode[32..40], &[0xff; 8]);
        assert_eq!(&inode[44..48], &2u32.to_le_bytes());
        assert_eq!(chunk_index(1, 0x1234), [0, 0, 1, 0, 0x34, 0x12, 0, 0]);
        assert_eq!(
            dirent(40, 36, FT_DIR),
            [40, 0, 0, 0, 0, 0, 0, 0, 36, 0, 2, 0]
        );
    }
}
