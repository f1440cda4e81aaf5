using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>
/// The real-time signal that interrupts KVM_RUN on a vcpu thread. CoreCLR uses SIGRTMIN, so this
/// uses SIGRTMIN+5. The handler is a one-byte executable stub (<c>ret</c>): no managed code runs
/// in signal context; the signal's only effect is that KVM_RUN returns EINTR.
/// </summary>
public static unsafe class KickSignal
{
    private static readonly object Gate = new();
    private static int _signal;
    private static nint _stub;

    /// <summary>The signal number used for kicks (installed on first use).</summary>
    public static int Signal
    {
        get
        {
            EnsureInstalled();
            return _signal;
        }
    }

    public static void EnsureInstalled()
    {
        if (Volatile.Read(ref _signal) != 0) return;
        lock (Gate)
        {
            if (_signal != 0) return;
            var signal = Native.CurrentSigRtMin() + 5;

            // SAFETY: a fresh anonymous page, written once, then made read+exec; never freed
            // because the handler may run on any thread until the process exits.
            var page = Native.Mmap(0, 4096, Native.PROT_READ | Native.PROT_WRITE,
                Native.MAP_PRIVATE | Native.MAP_ANONYMOUS, -1, 0);
            if (page == Native.MAP_FAILED) throw KvmException.Last("mmap(kick stub)");
            *(byte*)page = 0xC3; // ret
            if (Native.Mprotect(page, 4096, Native.PROT_READ | Native.PROT_EXEC) != 0)
                throw KvmException.Last("mprotect(kick stub)");

            var action = new Native.SigAction { Handler = page, Flags = Native.SA_RESTART };
            // SAFETY: action is a stack struct with the glibc layout; glibc adds SA_RESTORER.
            if (Native.Sigaction(signal, &action, null) != 0) throw KvmException.Last("sigaction(kick)");
            _stub = page;
            Volatile.Write(ref _signal, signal);
        }
    }

    /// <summary>Sends the kick signal to one thread of this process. Returns false if it is gone.</summary>
    public static bool SendTo(int tid)
    {
        EnsureInstalled();
        return Native.Tgkill(Native.GetPid(), tid, _signal) == 0;
    }

    [ThreadStatic] private static int _tid;

    /// <summary>The kernel's id of the calling thread (asked once per thread).</summary>
    public static int CurrentThreadId() => _tid != 0 ? _tid : _tid = Native.GetTid();
}
