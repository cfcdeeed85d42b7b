"""Intel MKL's kernel choice on AMD processors, corrected before torch loads.

Why: PyTorch's x86-64 wheels link Intel MKL for fp32 matrix products on the CPU (linear layers forward and
backward, the batched products inside attention, the rollouts' packed decode projections). MKL chooses its
kernels by the processor's vendor as well as by its instruction set: on an AMD processor it runs a generic
branch at about AVX2 speed even where the processor has AVX-512 (Zen 4, Zen 5). Measured on the project's 2-core AMD EPYC
(Zen 5) machine with `bench/blas_check.py --rounds 3`: a (2032 x 512) @ (512 x 1536) fp32 product, as in the PPO
passes of the `small` benchmark model, ran at 161 GFLOP/s, and at 394 GFLOP/s with this correction (2.1-2.5x
over the training shapes, 3.8x for 16-row decode products).

MKL asks the vendor question through one exported function, `mkl_serv_intel_cpu_true`. A shared library that
defines it (one line of C, compiled once with the system's C compiler into ~/.cache/alpaca_rlhf) and is loaded
into the process's global symbol scope before torch answers it: the dynamic linker binds MKL's call to the
first definition it finds, and that is the one loaded first. MKL then dispatches on the instruction sets the
processor reports (cpuid), as it does on Intel processors: on the Zen 5 machine it moved from code branch 0 to
its AVX-512 branch 7 (`mkl_code_branch()`), and it uses AMX only where cpuid reports AMX. Results are ordinary
fp32 products (tests/test_cpu_blas.py checks them against float64); their last bits can differ from the
other kernels', as between any two BLAS builds.

Applied by `import alpaca_rlhf` (the package's __init__) when torch is not loaded yet, on Linux x86-64 with an
AMD processor and a C compiler; a no-op elsewhere (Intel processors, GPUs' own libraries, ARM).
ALPACA_RLHF_MKL_VENDOR_FIX=0 switches it off. `STATUS` says what happened, `describe()` one line for logs.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

ENV_SWITCH = "ALPACA_RLHF_MKL_VENDOR_FIX"
SYMBOL = "mkl_serv_intel_cpu_true"
SHIM_SOURCE = f"/* answers Intel MKL's vendor check (alpaca_rlhf/cpu_blas.py) */\nint {SYMBOL}(void) {{ return 1; }}\n"

# what apply() did: "applied", "off", "not needed (...)", "not applied: ..." (set once per process)
STATUS = "not tried"


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's vendor id ('AuthenticAMD', 'GenuineIntel', ...) or '' where it cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alpaca_rlhf")


def build_shim(directory: str = "", compiler: str = "") -> str:
    """The shim's path, compiled on first use. The name carries a hash of the source, so a changed shim is
    rebuilt; it is written under a temporary name and renamed, so ranks starting together never load a
    half-written file. Raises RuntimeError (with the compiler's message) when it cannot be built."""
    directory = directory or cache_dir()
    digest = hashlib.sha1(SHIM_SOURCE.encode()).hexdigest()[:12]
    path = os.path.join(directory, f"mkl_vendor_shim-{digest}.so")
    if os.path.exists(path):
        return path
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found; set CC)")
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        source = os.path.join(tmp, "shim.c")
        with open(source, "w", encoding="utf-8") as f:
            f.write(SHIM_SOURCE)
        built = os.path.join(tmp, "shim.so")
        proc = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", built, source],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stdout.strip()[-500:]}")
        os.replace(built, path)
    return path


def apply(vendor: str = "", directory: str = "", compiler: str = "") -> str:
    """Load the shim into the global symbol scope when it is needed and can still take effect; returns (and
    records in STATUS) what happened. Never raises: a process that cannot be corrected runs as before."""
    global STATUS
    vendor = vendor or cpu_vendor()
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        STATUS = f"off ({ENV_SWITCH}=0)"
    elif not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        STATUS = f"not needed ({sys.platform} {platform.machine()})"
    elif vendor not in ("AuthenticAMD", "HygonGenuine"):
        STATUS = f"not needed ({vendor or 'unknown'} processor)"
    elif "torch" in sys.modules:
        # MKL's references were bound when torch loaded: a definition loaded now would not be used
        STATUS = "not applied: torch was imported before alpaca_rlhf"
    else:
        try:
            ctypes.CDLL(build_shim(directory, compiler), mode=ctypes.RTLD_GLOBAL)
            STATUS = "applied"
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            STATUS = f"not applied: {e}"
    return STATUS


def mkl_code_branch():
    """The kernel family MKL has chosen in this process (its mkl_serv_cpu_detect(): 0 = the generic branch it
    takes on AMD, 7 = AVX-512), read from torch's library once torch is loaded; None where torch has no MKL
    or is not loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return int(lib.mkl_serv_cpu_detect())
    except (OSError, AttributeError):
        return None


def describe() -> str:
    """One line for a run's log."""
    branch = mkl_code_branch()
    return (f"MKL vendor check on this {cpu_vendor() or 'unknown'} processor: {STATUS}"
            + (f" (MKL code branch {branch})" if branch is not None else ""))
