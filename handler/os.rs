//! The operating-system tricks, in one room behind a small safe API (the rest of the crate denies
//! `unsafe`): page-cache hints, direct I/O and its aligned buffers, the shard threads' scheduling
//! class, the allocator's arenas, and the crash points' kill. Each but the kill is a hint or a
//! tuning: where it fails or the OS lacks it, only speed or memory changes, never a result.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::fs::File;
use std::path::Path;

/// Ends the process at once, as a crash would (SIGKILL: no unwinding, no flush, no exit hooks).
pub fn kill_self() {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    #[cfg(not(unix))]
    std::process::abort();
}

/// Puts the calling thread in the idle scheduling class (else nice 10). SCHED_IDLE rather than a
/// nice value: under EEVDF a waking request thread preempts an idle-class thread at once, while a
/// nice one may finish its slice first (milliseconds).
pub fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain syscalls on the calling thread (pid 0); the policy and nice value are per
        // thread.
        unsafe {
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, thread, 10);
            }
        }
    }
}

/// At most two glibc malloc arenas. glibc gives each thread that allocates its own arena, up to 8
/// per core; the blocking threads that stream shards then keep their high-water marks, and the
/// process's memory grows with the export. Call once, before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives the memory freed in every malloc arena back to the system. A shard's pages (SQLite's
/// cache, a group of resources) are freed in many pieces among longer-lived ones, which glibc keeps
/// for reuse: without this the process's memory would grow to the sum of the shards' high-water
/// marks rather than stay at the largest. Call when a shard's run ends.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts writing the file's dirty pages back now (not waiting for them): the next `fsync` finds
/// less to do.
pub fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a hint on an open descriptor (0, 0: the whole file); failure only loses the head
        // start.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Drops `len` bytes of the file from `offset` from the page cache (pages read once and not again).
pub fn release_pages(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: advice on an open descriptor. Dirty pages are only written, never dropped, and
        // refusal (a pipe, say) only keeps the pages cached.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// How many of the file's first `len` bytes' pages are in the page cache (`mincore`), for tests.
#[cfg(target_os = "linux")]
pub fn cached_pages(file: &File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let pages = len.div_ceil(4096);
    let mut residency = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of an open file of `len` bytes, unmapped below.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        assert_eq!(libc::mincore(map, len, residency.as_mut_ptr()), 0);
        libc::munmap(map, len);
    }
    residency.iter().filter(|r| **r & 1 == 1).count()
}

/// Creates (or truncates) `path` for writing past the page cache (`O_DIRECT`); `Unsupported` where
/// the OS has no direct I/O.
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Whether a write failed because the file system refuses direct I/O (EINVAL).
pub fn refuses_direct_io(error: &std::io::Error) -> bool {
    #[cfg(target_os = "linux")]
    return error.raw_os_error() == Some(libc::EINVAL);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = error;
        false
    }
}

/// Turns direct I/O off for the rest of the file (its unaligned tail, or all of it).
pub fn buffer_from_now(file: &File) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flag changes on a descriptor this file owns.
        let changed = unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) == 0
        };
        match changed {
            true => Ok(()),
            false => Err(std::io::Error::last_os_error()),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Ok(())
    }
}

/// `size` bytes aligned to `align` (as direct I/O wants), of which the first `filled` hold data.
pub struct AlignedBuffer {
    memory: std::ptr::NonNull<u8>,
    layout: Layout,
    filled: usize,
}

// SAFETY: the buffer owns its memory; nothing else points into it.
unsafe impl Send for AlignedBuffer {}

impl AlignedBuffer {
    /// `size` must be non-zero and `align` a power of two.
    pub fn new(size: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(size, align).expect("a valid layout");
        assert!(size > 0, "an empty buffer");
        // SAFETY: the layout has a non-zero size.
        let memory = unsafe { std::alloc::alloc(layout) };
        let memory = std::ptr::NonNull::new(memory)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self {
            memory,
            layout,
            filled: 0,
        }
    }

    pub fn filled(&self) -> &[u8] {
        // SAFETY: the first `filled` bytes were written by `fill`.
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr(), self.filled) }
    }

    /// Copies as much of `data` as fits; returns how much that was.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let taken = data.len().min(self.layout.size() - self.filled);
        // SAFETY: `taken` bytes fit after `filled` in the allocation, and `data` is not in it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.memory.as_ptr().add(self.filled),
                taken,
            );
        }
        self.filled += taken;
        taken
    }

    pub fn is_full(&self) -> bool {
        self.filled == self.layout.size()
    }

    pub fn clear(&mut self) {
        self.filled = 0;
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.memory.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aligned_buffer_is_aligned_and_fills_up_to_its_size() {
        let mut buffer = AlignedBuffer::new(8192, 4096);
        assert_eq!(buffer.memory.as_ptr() as usize % 4096, 0);
        assert_eq!(buffer.fill(&[1; 5000]), 5000);
        assert_eq!(buffer.fill(&[2; 5000]), 3192);
        assert!(buffer.is_full());
        assert_eq!(buffer.filled().len(), 8192);
        assert_eq!(buffer.filled()[4999..5001], [1, 2]);
        buffer.clear();
        assert!(buffer.filled().is_empty());
    }
}
