//! The memory allocator of every Trellis process. glibc's malloc gives each thread
//! that allocates an arena of its own and keeps what is freed in it, so a service's
//! memory after a burst of calls stays near its peak; mimalloc returns freed pages
//! to the system soon after, and is no slower. Declared here, once, so that every
//! binary linking this crate (the services, `trellis`, the tests) uses it.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
