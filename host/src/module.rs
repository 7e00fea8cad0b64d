//! The module cache and typed kernel launches.
//!
//! Each PTX module is loaded once per device: JIT-compiled by the driver on a GPU
//! (`cuModuleLoadDataEx`, with the JIT's error log captured into the error on failure), parsed
//! by the interpreter on the simulated device. A launch checks its arguments against the
//! kernel's descriptor (count, pointer element types, which pointers are written, tensor maps)
//! before anything reaches the driver or the simulator; on the simulated device the pointer
//! arguments also bound every global access the kernel makes.

use crate::device::{Backend, Device};
use crate::error::{Context, Error, Result};
use crate::stream::Stream;
use cudarc::driver::{result, sys};
use lathe_kernels::{ArgKind, Elem, Geometry, KernelDesc, Module, Problem};
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex};

pub(crate) struct LoadedModule {
    raw: sys::CUmodule,
    ctx: Arc<cudarc::driver::CudaContext>,
}

// SAFETY: a CUmodule handle may be used from any thread once its context is current; Lathe
// binds the context before every use.
unsafe impl Send for LoadedModule {}
// SAFETY: as above; the handle is never mutated after loading.
unsafe impl Sync for LoadedModule {}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the module was loaded by us and is unloaded once, when the last function
        // that refers to it (which holds an Arc) is gone.
        let _ = unsafe { result::module::unload(self.raw) };
    }
}

#[derive(Clone)]
pub(crate) struct Function {
    raw: sys::CUfunction,
    _module: Arc<LoadedModule>,
    /// Dynamic shared memory the function has been opted in to (above 48 KiB needs it).
    shared_optin: Arc<Mutex<u32>>,
}

// SAFETY: CUfunction handles are usable from any thread with the context current.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

#[derive(Default)]
pub(crate) struct ModuleCache {
    modules: Mutex<HashMap<&'static str, Arc<LoadedModule>>>,
    functions: Mutex<HashMap<&'static str, Function>>,
}

fn load_with_log(
    dev: &Device,
    ctx: &Arc<cudarc::driver::CudaContext>,
    m: &Module,
) -> Result<Arc<LoadedModule>> {
    dev.bind()?;
    let ptx = (m.ptx)();
    let src = CString::new(ptx.as_bytes())
        .map_err(|_| Error::Invalid(format!("PTX of module `{}` contains a NUL byte", m.name)))?;
    const LOG: usize = 16 * 1024;
    let mut err_log = vec![0u8; LOG];
    let mut info_log = vec![0u8; LOG];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut values: [*mut c_void; 4] = [
        err_log.as_mut_ptr().cast(),
        LOG as *mut c_void,
        info_log.as_mut_ptr().cast(),
        LOG as *mut c_void,
    ];
    let mut raw: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: the context is current; `src` is a NUL-terminated PTX image; the option arrays
    // have 4 entries each and the log buffers outlive the call (sizes passed by value, as the
    // driver API specifies for the *_SIZE_BYTES options).
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            &mut raw,
            src.as_ptr().cast(),
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        let text = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        let mut log = text(&err_log);
        let info = text(&info_log);
        if !info.is_empty() {
            log.push_str(&info);
        }
        return Err(Error::Jit {
            module: m.name.to_string(),
            device: dev.describe(),
            source: result::DriverError(r),
            log,
        });
    }
    Ok(Arc::new(LoadedModule {
        raw,
        ctx: ctx.clone(),
    }))
}

impl Device {
    /// Loads a module if this device has not yet (each module once per device).
    pub fn load_module(&self, m: &'static Module) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda { .. } => self.module(m).map(|_| ()),
            Backend::Sim { .. } => self.sim_module(m).map(|_| ()),
        }
    }

    fn module(&self, m: &'static Module) -> Result<Arc<LoadedModule>> {
        let Backend::Cuda { ctx, modules } = &self.inner.backend else {
            return Err(Error::Invalid("not a CUDA device".into()));
        };
        let mut mods = modules.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = mods.get(m.name) {
            return Ok(l.clone());
        }
        let l = load_with_log(self, ctx, m)?;
        mods.insert(m.name, l.clone());
        Ok(l)
    }

    /// The parsed module on the simulated device.
    fn sim_module(&self, m: &'static Module) -> Result<lathe_sim::Module> {
        let Backend::Sim { sim, modules } = &self.inner.backend else {
            return Err(Error::Invalid("not a simulated device".into()));
        };
        let mut mods = modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = mods.get(m.name) {
            return Ok(l.clone());
        }
        let l = sim
            .load_module(&(m.ptx)())
            .map_err(|e| Error::sim(format!("loading PTX module `{}`", m.name), e))?;
        mods.insert(m.name, l.clone());
        Ok(l)
    }

    fn check_target(&self, k: &'static KernelDesc) -> Result<()> {
        if !k.module.target.runs_on(self.inner.cc) {
            return Err(Error::UnsupportedTarget {
                entry: k.entry,
                target: k.module.target.name(),
                device: self.describe(),
                major: self.inner.cc.0,
                minor: self.inner.cc.1,
            });
        }
        Ok(())
    }

    pub(crate) fn function(&self, k: &'static KernelDesc) -> Result<Function> {
        self.check_target(k)?;
        let Backend::Cuda { modules, .. } = &self.inner.backend else {
            return Err(Error::Invalid("not a CUDA device".into()));
        };
        {
            let fns = modules.functions.lock();
            if let Some(f) = fns.unwrap_or_else(|e| e.into_inner()).get(k.entry) {
                return Ok(f.clone());
            }
        }
        let module = self.module(k.module)?;
        let name = CString::new(k.entry).map_err(|_| Error::Invalid("NUL in entry".into()))?;
        // SAFETY: the module is loaded in this device's context, which `module` bound.
        let raw =
            unsafe { result::module::get_function(module.raw, name) }.ctx("cuModuleGetFunction")?;
        let f = Function {
            raw,
            _module: module,
            shared_optin: Arc::new(Mutex::new(48 * 1024)),
        };
        modules
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k.entry, f.clone());
        Ok(f)
    }
}

/// A TMA tensor map as a kernel receives it: 128 bytes, 64-byte aligned. On a GPU the driver
/// encodes it (`cuTensorMapEncodeTiled`); on the simulated device Lathe's own encoder does.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct TensorMapBytes(pub [u8; 128]);

impl std::fmt::Debug for TensorMapBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TensorMapBytes(..)")
    }
}

/// One argument of a launch. Pointers carry the element type and length of the buffer they
/// come from so the launch can check them against the descriptor.
#[derive(Clone, Copy, Debug)]
pub enum KernelArg {
    Ptr {
        addr: u64,
        elem: Elem,
        len: usize,
        writable: bool,
    },
    U32(u32),
    U64(u64),
    F32(f32),
    /// A tensor map over `bytes` bytes of `elem` at `addr` (the tensor it describes; the
    /// kernel only reads it through TMA).
    TensorMap {
        map: TensorMapBytes,
        elem: Elem,
        addr: u64,
        bytes: u64,
    },
}

/// One parameter's bytes, aligned for any parameter kind (tensor maps need 64).
#[repr(C, align(64))]
struct ParamSlot([u8; 128]);

impl KernelArg {
    fn slot(&self) -> ParamSlot {
        let mut b = [0u8; 128];
        match self {
            KernelArg::Ptr { addr, .. } => b[..8].copy_from_slice(&addr.to_ne_bytes()),
            KernelArg::U64(v) => b[..8].copy_from_slice(&v.to_ne_bytes()),
            KernelArg::U32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            KernelArg::F32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            KernelArg::TensorMap { map, .. } => b.copy_from_slice(&map.0),
        }
        ParamSlot(b)
    }

    /// The parameter value and the memory range it grants, for the simulated device.
    fn sim_param(&self) -> (lathe_sim::Param, Option<lathe_sim::Region>) {
        use lathe_sim::{Param, Region};
        match *self {
            KernelArg::Ptr {
                addr,
                elem,
                len,
                writable,
            } => (
                Param::U64(addr),
                Some(Region {
                    addr,
                    bytes: (len * elem.size()) as u64,
                    writable,
                }),
            ),
            KernelArg::U32(v) => (Param::U32(v), None),
            KernelArg::U64(v) => (Param::U64(v), None),
            KernelArg::F32(v) => (Param::F32(v), None),
            KernelArg::TensorMap {
                map, addr, bytes, ..
            } => (
                Param::Bytes(map.0.to_vec()),
                Some(Region {
                    addr,
                    bytes,
                    writable: false,
                }),
            ),
        }
    }
}

/// Checks `args` against the descriptor: count, kinds, pointer element types, writability.
pub fn check_args(k: &KernelDesc, args: &[KernelArg]) -> Result<()> {
    let bad = |problem: String| Error::BadLaunch {
        entry: k.entry,
        problem,
    };
    if args.len() != k.args.len() {
        return Err(bad(format!(
            "{} arguments given, the kernel takes {} ({})",
            args.len(),
            k.args.len(),
            k.args.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
        )));
    }
    for (a, d) in args.iter().zip(k.args) {
        let ok = match (d.kind, a) {
            (ArgKind::In(e), KernelArg::Ptr { elem, .. }) => *elem == e,
            (ArgKind::Out(e), KernelArg::Ptr { elem, writable, .. }) => *elem == e && *writable,
            (ArgKind::U32, KernelArg::U32(_)) => true,
            (ArgKind::U64, KernelArg::U64(_)) => true,
            (ArgKind::F32, KernelArg::F32(_)) => true,
            (ArgKind::TensorMap(e), KernelArg::TensorMap { elem, .. }) => *elem == e,
            _ => false,
        };
        if !ok {
            return Err(bad(format!(
                "argument `{}` expects {:?}, got {a:?}",
                d.name, d.kind
            )));
        }
    }
    Ok(())
}

impl Device {
    /// Launches `k` for `problem` on `stream` with `args` (checked against the descriptor).
    ///
    /// The kernel reads and writes the buffers behind the pointer arguments asynchronously:
    /// those buffers must stay alive until the stream has passed this launch. Lathe's buffers
    /// return to a stream-ordered pool when dropped, so dropping one right after the launch on
    /// the same stream is safe. On the simulated device the launch runs to completion first,
    /// and a sanitizer finding or fault is returned as [`Error::Sim`].
    pub fn launch(
        &self,
        k: &'static KernelDesc,
        problem: &Problem,
        args: &[KernelArg],
        stream: &Stream,
    ) -> Result<()> {
        self.launch_with(k, &(k.geometry)(problem), problem, args, stream)
    }

    /// [`Device::launch`] with an explicit geometry instead of the descriptor's (e.g. a
    /// persistent kernel launched with one block per SM). `problem` still gives the cost.
    pub fn launch_with(
        &self,
        k: &'static KernelDesc,
        g: &Geometry,
        problem: &Problem,
        args: &[KernelArg],
        stream: &Stream,
    ) -> Result<()> {
        check_args(k, args)?;
        self.check_target(k)?;
        if g.grid.0 == 0 || g.grid.1 == 0 || g.grid.2 == 0 {
            return Err(Error::BadLaunch {
                entry: k.entry,
                problem: format!("empty grid {:?} for {problem:?}", g.grid),
            });
        }
        if g.shared_bytes > self.inner.max_shared_optin {
            return Err(Error::BadLaunch {
                entry: k.entry,
                problem: format!(
                    "needs {} bytes of shared memory, the device allows {}",
                    g.shared_bytes, self.inner.max_shared_optin
                ),
            });
        }
        match &self.inner.backend {
            Backend::Cuda { .. } => self.launch_cuda(k, g, problem, args, stream),
            Backend::Sim { sim, .. } => {
                let module = self.sim_module(k.module)?;
                let (params, regions): (Vec<_>, Vec<_>) =
                    args.iter().map(KernelArg::sim_param).unzip();
                let launch = lathe_sim::Launch {
                    grid: g.grid,
                    block: g.block,
                    shared_bytes: g.shared_bytes,
                    params,
                    regions: regions.into_iter().flatten().collect(),
                };
                let submitted = std::time::Instant::now();
                let counters = sim
                    .launch(&module, k.entry, &launch)
                    .map_err(|e| Error::sim(format!("launch of `{}`", k.entry), e))?;
                log_sim_launch(k.entry);
                self.record_sim_launch(k.entry, stream, submitted, (k.cost)(problem), counters);
                Ok(())
            }
        }
    }

    fn launch_cuda(
        &self,
        k: &'static KernelDesc,
        g: &Geometry,
        problem: &Problem,
        args: &[KernelArg],
        stream: &Stream,
    ) -> Result<()> {
        let f = self.function(k)?;
        if g.shared_bytes > 48 * 1024 {
            let mut optin = f.shared_optin.lock().unwrap_or_else(|e| e.into_inner());
            if *optin < g.shared_bytes {
                // SAFETY: a valid function handle and attribute; the value is within the
                // device's opt-in limit (checked by the caller).
                unsafe {
                    result::function::set_function_attribute(
                        f.raw,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        g.shared_bytes as i32,
                    )
                }
                .ctx("cuFuncSetAttribute")?;
                *optin = g.shared_bytes;
            }
        }
        let mut storage: Vec<ParamSlot> = args.iter().map(KernelArg::slot).collect();
        let mut params: Vec<*mut c_void> = storage
            .iter_mut()
            .map(|b| b.0.as_mut_ptr().cast::<c_void>())
            .collect();
        self.bind()?;
        let raw_stream = stream.cu()?;
        let timed = self.timing_start(stream)?;
        // SAFETY: the argument list matches the kernel's PTX parameter list in count and
        // kind (check_args, and the registry tests that compare descriptors with the PTX);
        // each parameter value lives in `storage`, 64-byte aligned, until the call returns
        // (the driver copies them at launch); pointers are device addresses of live Lathe
        // buffers and tensor maps describe live buffers.
        unsafe {
            result::launch_kernel(
                f.raw,
                g.grid,
                g.block,
                g.shared_bytes,
                raw_stream,
                &mut params,
            )
        }
        .ctx("cuLaunchKernel")?;
        if let Some(start) = timed {
            self.timing_end(start, stream, k.entry, (k.cost)(problem))?;
        }
        Ok(())
    }
}

/// With `LATHE_SIM_LAUNCH_LOG=FILE`, every kernel that completes on a simulated device appends
/// its entry name to FILE (one line per launch; appends of one short line are atomic, so test
/// threads and processes may share the file). `scripts/test` uses it to check that every
/// registered kernel ran on the simulator. Failing to write the log never fails the launch.
fn log_sim_launch(entry: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("LATHE_SIM_LAUNCH_LOG") else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{entry}\n").as_bytes());
    }
}
