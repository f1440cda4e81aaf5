using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>Why a registered page faulted (uffd_msg.pagefault.flags).</summary>
public enum FaultKind
{
    /// <summary>No page in the backing (shmem: not in the memfd's page cache).</summary>
    Missing,
    /// <summary>A write to a page write-protected with UFFDIO_WRITEPROTECT / *_MODE_WP.</summary>
    WriteProtect,
    /// <summary>The page is in the page cache but not mapped in this VMA (e.g. after MADV_DONTNEED).</summary>
    Minor,
}

/// <summary>One page fault read from a userfaultfd. <paramref name="ThreadId"/> is null unless
/// UFFD_FEATURE_THREAD_ID is enabled.</summary>
public readonly record struct UffdFault(ulong Address, FaultKind Kind, bool Write, uint? ThreadId);

/// <summary>UFFD_FEATURE_* bits (uffdio_api.features).</summary>
[Flags]
public enum UffdFeatures : ulong
{
    None = 0,
    PagefaultFlagWp = 1 << 0,
    EventFork = 1 << 1,
    EventRemap = 1 << 2,
    EventRemove = 1 << 3,
    MissingHugetlbfs = 1 << 4,
    MissingShmem = 1 << 5,
    EventUnmap = 1 << 6,
    Sigbus = 1 << 7,
    ThreadId = 1 << 8,
    MinorHugetlbfs = 1 << 9,
    MinorShmem = 1 << 10,
    ExactAddress = 1 << 11,
    /// <summary>UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write-protect mode on shmem (and hugetlbfs).</summary>
    WpShmem = 1 << 12,
    WpUnpopulated = 1 << 13,
    Poison = 1 << 14,
    WpAsync = 1 << 15,
    Move = 1 << 16,

    /// <summary>What a vmspace on memfd wants: MISSING, MINOR and WP on shmem, and the faulting thread's id.
    /// No EVENT_*: the vmspace itself is the only one to zap or punch its memory, and EVENT_REMOVE
    /// would make every MADV_DONTNEED wait for the reader.</summary>
    ForShmemVmspace = PagefaultFlagWp | MissingShmem | MinorShmem | WpShmem | ThreadId,
}

/// <summary>UFFDIO_REGISTER_MODE_* bits.</summary>
[Flags]
public enum UffdRegisterMode : ulong
{
    Missing = 1 << 0,
    WriteProtect = 1 << 1,
    Minor = 1 << 2,
}

/// <summary>The range ioctls UFFDIO_REGISTER reports as usable on a range (1 &lt;&lt; _UFFDIO_*).</summary>
[Flags]
public enum UffdRangeIoctls : ulong
{
    None = 0,
    Wake = 1 << 2,
    Copy = 1 << 3,
    ZeroPage = 1 << 4,
    Move = 1 << 5,
    WriteProtect = 1 << 6,
    Continue = 1 << 7,
    Poison = 1 << 8,
}

/// <summary>
/// Outcome of a resolving ioctl (COPY, ZEROPAGE, CONTINUE). Anything other than
/// <see cref="Filled"/> is an expected race, not an error: wake the range and let the kernel
/// re-raise the fault with its true kind if the faulting thread still needs it.
/// </summary>
public enum UffdFill
{
    Filled,
    /// <summary>EEXIST: the page is already mapped here, or (COPY/ZEROPAGE on shmem) already in the page cache.</summary>
    AlreadyMapped,
    /// <summary>EFAULT from CONTINUE: the page is no longer in the page cache.</summary>
    NoPage,
    /// <summary>EAGAIN: the address space is changing; nothing was filled.</summary>
    Retry,
}

/// <summary>A userfaultfd call that failed.</summary>
public sealed class UserfaultfdException : Exception
{
    public string Operation { get; }
    public int Errno { get; }

    public UserfaultfdException(string operation, int errno)
        : base($"{operation} failed: {Native.ErrorText(errno)} (errno {errno})")
    {
        Operation = operation;
        Errno = errno;
    }

    public UserfaultfdException(string message) : base(message) => Operation = "";
}

/// <summary>
/// A userfaultfd (see Documentation/admin-guide/mm/userfaultfd.rst): created with the syscall
/// (O_CLOEXEC|O_NONBLOCK; never UFFD_USER_MODE_ONLY — KVM's own accesses to guest memory must fault
/// too), falling back to /dev/userfaultfd + USERFAULTFD_IOC_NEW; then the UFFDIO_API handshake.
/// The ioctls may be called from any thread, concurrently with a reader.
/// <para>
/// Never touch a registered range from managed code. A thread blocked in a userfaultfd fault while
/// executing managed code is in cooperative GC mode: a GC waits for it forever, while the thread
/// that would resolve the fault (managed too) is suspended by that GC — a deadlock. Code that must
/// touch a registered range does it inside a P/Invoke (libc memcpy), in preemptive mode, as vcpus
/// fault inside KVM_RUN; devices and loaders use the host view, which is not registered.
/// </para>
/// <para>
/// Measured on this machine (kernel 6.18, shmem memfd mapped MAP_SHARED, by the gcc program
/// tests/Actors.Memory.Tests/probe/uffd_probe.c; UserfaultfdTests there re-check it):
/// features 0x1FFFF (all of them, including MISSING/MINOR/WP on shmem); MISSING|WP|MINOR
/// registered together on one shmem VMA works, range ioctls 0x1FC (WAKE, COPY, ZEROPAGE, MOVE,
/// WRITEPROTECT, CONTINUE, POISON); UFFDIO_ZEROPAGE works on shmem (it allocates a zeroed page in the
/// memfd: shmem has no shared zero page); UFFDIO_COPY_MODE_WP and UFFDIO_CONTINUE_MODE_WP work;
/// a second UFFDIO_API on one fd fails with EINVAL (so features are probed on a throw-away fd).
/// MADV_DONTNEED on the guest view of a write-protected page keeps the WP marker, but a plain
/// CONTINUE then maps the page writable: CONTINUE needs MODE_WP to keep the protection. A write to
/// such a zapped page is reported as MINOR|WRITE, not WP. ZEROPAGE over a WP marker drops it.
/// CONTINUE on a punched page fails with EFAULT; COPY/ZEROPAGE onto a page that is in the page
/// cache (mapped or not) fail with EEXIST. UNREGISTER and close() wake blocked faulters, which then
/// fault normally (no SIGBUS without UFFD_FEATURE_SIGBUS).
/// </para>
/// </summary>
public sealed unsafe class Userfaultfd : IDisposable
{
    public const ulong PageSize = 4096;

    private int _fd;

    public int Fd => _fd;

    /// <summary>Every feature this kernel offers.</summary>
    public UffdFeatures Available { get; }

    /// <summary>The features enabled on this fd (asked for and available).</summary>
    public UffdFeatures Enabled { get; }

    /// <summary>Asked for but not offered by this kernel.</summary>
    public UffdFeatures Missing { get; }

    /// <summary>uffdio_api.ioctls: the fd-wide ioctls (API, REGISTER, UNREGISTER).</summary>
    public ulong Ioctls { get; }

    public bool ThreadIds => (Enabled & UffdFeatures.ThreadId) != 0;

    private Userfaultfd(int fd, UffdFeatures available, UffdFeatures enabled, UffdFeatures missing, ulong ioctls)
    {
        _fd = fd;
        Available = available;
        Enabled = enabled;
        Missing = missing;
        Ioctls = ioctls;
    }

    /// <summary>
    /// Opens a userfaultfd and enables <paramref name="wanted"/> ∩ available. Features the kernel
    /// lacks are not an error here: they are listed in <see cref="Missing"/> (and
    /// <see cref="Describe"/>) for the caller to decide.
    /// </summary>
    public static Userfaultfd Create(UffdFeatures wanted = UffdFeatures.ForShmemVmspace)
    {
        CheckLayouts();
        // UFFDIO_API may be called once per fd: learn what exists on a throw-away fd first.
        var probe = Open();
        UffdFeatures available;
        try { available = (UffdFeatures)Handshake(probe, 0).Features; }
        finally { Native.Close(probe); }

        var enable = wanted & available;
        var fd = Open();
        try
        {
            var api = Handshake(fd, (ulong)enable);
            return new Userfaultfd(fd, available, enable, wanted & ~available, api.Ioctls);
        }
        catch
        {
            Native.Close(fd);
            throw;
        }
    }

    /// <summary>"features 0x…; missing: MinorShmem" — for logs and failure reports.</summary>
    public string Describe() =>
        $"userfaultfd fd {_fd}: enabled {Enabled} (0x{(ulong)Enabled:X}), kernel offers 0x{(ulong)Available:X}" +
        (Missing == UffdFeatures.None ? "" : $"; missing: {Missing}");

    private static int Open()
    {
        var fd = NativeMemory.Syscall(NativeMemory.SYS_userfaultfd, NativeMemory.O_CLOEXEC | NativeMemory.O_NONBLOCK);
        if (fd >= 0) return (int)fd;
        var syscallErrno = Marshal.GetLastPInvokeError();
        // The syscall can be refused (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or
        // seccomp); /dev/userfaultfd is governed by its file mode instead.
        var dev = Native.Open("/dev/userfaultfd", NativeMemory.O_RDWR | NativeMemory.O_CLOEXEC);
        if (dev < 0)
            throw new UserfaultfdException(
                $"userfaultfd(2) failed ({Native.ErrorText(syscallErrno)}) and /dev/userfaultfd could not be opened " +
                $"({Native.ErrorText(Marshal.GetLastPInvokeError())})");
        try
        {
            var r = Native.Ioctl(dev, NativeMemory.USERFAULTFD_IOC_NEW, NativeMemory.O_CLOEXEC | NativeMemory.O_NONBLOCK);
            if (r < 0) throw new UserfaultfdException("USERFAULTFD_IOC_NEW", Marshal.GetLastPInvokeError());
            return r;
        }
        finally { Native.Close(dev); }
    }

    private static NativeMemory.UffdioApi Handshake(int fd, ulong features)
    {
        var api = new NativeMemory.UffdioApi { Api = NativeMemory.UFFD_API, Features = features };
        // SAFETY: api is a stack struct of the kernel's size (checked in CheckLayouts).
        if (Native.Ioctl(fd, NativeMemory.UFFDIO_API, &api) != 0)
            throw new UserfaultfdException($"UFFDIO_API(features 0x{features:X})", Marshal.GetLastPInvokeError());
        return api;
    }

    private static void CheckLayouts()
    {
        if (sizeof(NativeMemory.UffdioApi) != 24 || sizeof(NativeMemory.UffdioRange) != 16 ||
            sizeof(NativeMemory.UffdioRegister) != 32 || sizeof(NativeMemory.UffdioCopy) != 40 ||
            sizeof(NativeMemory.UffdioZeropage) != 32 || sizeof(NativeMemory.UffdioWriteprotect) != 24 ||
            sizeof(NativeMemory.UffdioContinue) != 32 || sizeof(NativeMemory.PollFd) != 8)
            throw new UserfaultfdException("userfaultfd struct layouts do not match the x86-64 kernel ABI");
    }

    private int Ioctl(nuint request, void* arg)
    {
        var fd = _fd;
        if (fd < 0) throw new ObjectDisposedException(nameof(Userfaultfd));
        return Native.Ioctl(fd, request, arg) == 0 ? 0 : Marshal.GetLastPInvokeError();
    }

    private static void CheckRange(nint start, ulong length)
    {
        if (((ulong)start & (PageSize - 1)) != 0 || length == 0 || (length & (PageSize - 1)) != 0)
            throw new ArgumentException($"range 0x{(ulong)start:X}+0x{length:X} is not page aligned");
    }

    /// <summary>Registers a range; returns the range ioctls the kernel allows on it.</summary>
    public UffdRangeIoctls Register(nint start, ulong length, UffdRegisterMode mode)
    {
        CheckRange(start, length);
        var reg = new NativeMemory.UffdioRegister { Range = new() { Start = (ulong)start, Len = length }, Mode = (ulong)mode };
        // SAFETY: reg is a local with the layout of the kernel's struct uffdio_register, alive for the
        // whole call; the ioctl reads and writes only that struct.
        var err = Ioctl(NativeMemory.UFFDIO_REGISTER, &reg);
        if (err != 0) throw new UserfaultfdException($"UFFDIO_REGISTER(0x{(ulong)start:X}+0x{length:X}, {mode})", err);
        return (UffdRangeIoctls)reg.Ioctls;
    }

    /// <summary>Unregisters a range; threads blocked on faults in it wake and fault normally.</summary>
    public void Unregister(nint start, ulong length)
    {
        CheckRange(start, length);
        var range = new NativeMemory.UffdioRange { Start = (ulong)start, Len = length };
        // SAFETY: range is a local with the layout of the kernel's struct uffdio_range, alive for the
        // whole call; the ioctl reads and writes only that struct.
        var err = Ioctl(NativeMemory.UFFDIO_UNREGISTER, &range);
        if (err != 0) throw new UserfaultfdException($"UFFDIO_UNREGISTER(0x{(ulong)start:X}+0x{length:X})", err);
    }

    /// <summary>
    /// UFFDIO_COPY: atomically fills missing pages at <paramref name="destination"/> with
    /// <paramref name="source"/> (a whole number of pages) and wakes the faulters unless
    /// <paramref name="wake"/> is false. With <paramref name="writeProtect"/> the pages are mapped
    /// write-protected, so the next write is a WP fault.
    /// </summary>
    public UffdFill Copy(nint destination, ReadOnlySpan<byte> source, bool writeProtect = false, bool wake = true)
    {
        CheckRange(destination, (ulong)source.Length);
        var mode = (writeProtect ? NativeMemory.UFFDIO_COPY_MODE_WP : 0) | (wake ? 0 : NativeMemory.UFFDIO_COPY_MODE_DONTWAKE);
        // SAFETY: source is pinned for the whole block, so the kernel reads its bytes at a fixed
        // address.
        fixed (byte* src = source)
        {
            ulong done = 0, length = (ulong)source.Length;
            while (true)
            {
                var copy = new NativeMemory.UffdioCopy
                {
                    Dst = (ulong)destination + done, Src = (ulong)src + done, Len = length - done, Mode = mode,
                };
                // SAFETY: src is pinned for the call and holds Len bytes from Src; the kernel only
                // writes copy.Copy.
                var err = Ioctl(NativeMemory.UFFDIO_COPY, &copy);
                if (err == 0) return UffdFill.Filled;
                if (copy.Copy > 0) done += (ulong)copy.Copy; // partial copy: retry the rest
                if (err == NativeMemory.EAGAIN && copy.Copy > 0 && done < length) continue;
                return err switch
                {
                    NativeMemory.EEXIST => UffdFill.AlreadyMapped,
                    NativeMemory.EAGAIN => UffdFill.Retry,
                    _ => throw new UserfaultfdException($"UFFDIO_COPY(0x{(ulong)destination + done:X}+0x{length - done:X})", err),
                };
            }
        }
    }

    /// <summary>UFFDIO_ZEROPAGE: fills missing pages with zeros (on shmem: allocates zeroed pages).</summary>
    public UffdFill ZeroPage(nint destination, ulong length, bool wake = true)
    {
        CheckRange(destination, length);
        var zp = new NativeMemory.UffdioZeropage
        {
            Range = new() { Start = (ulong)destination, Len = length },
            Mode = wake ? 0 : NativeMemory.UFFDIO_ZEROPAGE_MODE_DONTWAKE,
        };
        // SAFETY: zp is a local with the layout of the kernel's struct uffdio_zeropage, alive for the
        // whole call; the ioctl reads and writes only that struct.
        var err = Ioctl(NativeMemory.UFFDIO_ZEROPAGE, &zp);
        return err switch
        {
            0 => UffdFill.Filled,
            NativeMemory.EEXIST => UffdFill.AlreadyMapped,
            NativeMemory.EAGAIN => UffdFill.Retry,
            _ => throw new UserfaultfdException($"UFFDIO_ZEROPAGE(0x{(ulong)destination:X}+0x{length:X})", err),
        };
    }

    /// <summary>
    /// UFFDIO_CONTINUE: maps pages that are already in the page cache (resolves MINOR faults).
    /// <paramref name="writeProtect"/> maps them write-protected (UFFDIO_CONTINUE_MODE_WP).
    /// </summary>
    public UffdFill Continue(nint start, ulong length, bool writeProtect = false, bool wake = true)
    {
        CheckRange(start, length);
        var c = new NativeMemory.UffdioContinue
        {
            Range = new() { Start = (ulong)start, Len = length },
            Mode = (writeProtect ? NativeMemory.UFFDIO_CONTINUE_MODE_WP : 0) | (wake ? 0 : NativeMemory.UFFDIO_CONTINUE_MODE_DONTWAKE),
        };
        // SAFETY: c is a local with the layout of the kernel's struct uffdio_continue, alive for the
        // whole call; the ioctl reads and writes only that struct.
        var err = Ioctl(NativeMemory.UFFDIO_CONTINUE, &c);
        return err switch
        {
            0 => UffdFill.Filled,
            NativeMemory.EEXIST => UffdFill.AlreadyMapped,
            NativeMemory.EFAULT => UffdFill.NoPage,
            NativeMemory.EAGAIN => UffdFill.Retry,
            _ => throw new UserfaultfdException($"UFFDIO_CONTINUE(0x{(ulong)start:X}+0x{length:X}{(writeProtect ? ", WP" : "")})", err),
        };
    }

    /// <summary>
    /// UFFDIO_WRITEPROTECT: <paramref name="protect"/> = true write-protects the range (on shmem also
    /// pages not mapped yet: a marker is left); false removes the protection and wakes WP faulters
    /// unless <paramref name="wake"/> is false.
    /// </summary>
    public void WriteProtect(nint start, ulong length, bool protect, bool wake = true)
    {
        CheckRange(start, length);
        for (var attempt = 0; ; attempt++)
        {
            var wp = new NativeMemory.UffdioWriteprotect
            {
                Range = new() { Start = (ulong)start, Len = length },
                Mode = (protect ? NativeMemory.UFFDIO_WRITEPROTECT_MODE_WP : 0) | (wake ? 0 : NativeMemory.UFFDIO_WRITEPROTECT_MODE_DONTWAKE),
            };
            // SAFETY: wp is a local with the layout of the kernel's struct uffdio_writeprotect, alive
            // for the whole call; the ioctl reads and writes only that struct.
            var err = Ioctl(NativeMemory.UFFDIO_WRITEPROTECT, &wp);
            if (err == 0) return;
            if (err == NativeMemory.EAGAIN && attempt < 100) continue;
            throw new UserfaultfdException($"UFFDIO_WRITEPROTECT(0x{(ulong)start:X}+0x{length:X}, {(protect ? "on" : "off")})", err);
        }
    }

    /// <summary>UFFDIO_WAKE: wakes threads blocked on faults in the range (they retry the access).</summary>
    public void Wake(nint start, ulong length)
    {
        CheckRange(start, length);
        var range = new NativeMemory.UffdioRange { Start = (ulong)start, Len = length };
        // SAFETY: range is a local with the layout of the kernel's struct uffdio_range, alive for the
        // whole call; the ioctl reads and writes only that struct.
        var err = Ioctl(NativeMemory.UFFDIO_WAKE, &range);
        if (err != 0) throw new UserfaultfdException($"UFFDIO_WAKE(0x{(ulong)start:X}+0x{length:X})", err);
    }

    /// <summary>
    /// Waits up to <paramref name="timeoutMs"/> (-1: forever) for faults and reads as many as fit.
    /// Returns 0 on timeout. For a reader thread that must also be stoppable, use <see cref="UffdReader"/>.
    /// </summary>
    public int ReadFaults(Span<UffdFault> into, int timeoutMs)
    {
        var pfd = new NativeMemory.PollFd { Fd = _fd, Events = NativeMemory.POLLIN };
        // SAFETY: pfd is one local struct pollfd, alive for the call, and poll is told nfds = 1.
        var r = NativeMemory.Poll(&pfd, 1, timeoutMs);
        if (r < 0)
        {
            var err = Marshal.GetLastPInvokeError();
            if (err == NativeMemory.EINTR) return 0;
            throw new UserfaultfdException("poll(userfaultfd)", err);
        }
        if (r == 0) return 0;
        if ((pfd.Revents & (NativeMemory.POLLERR | NativeMemory.POLLNVAL)) != 0)
            throw new UserfaultfdException($"poll(userfaultfd) reported revents 0x{pfd.Revents:X}");
        return ReadAvailable(into, out _);
    }

    /// <summary>
    /// Non-blocking read of queued messages; returns the page faults decoded into
    /// <paramref name="into"/> (0 if none are queued). Other events (none are enabled) are counted
    /// in <paramref name="ignored"/>.
    /// </summary>
    internal int ReadAvailable(Span<UffdFault> into, out int ignored)
    {
        ignored = 0;
        if (into.Length == 0) return 0;
        var max = Math.Min(into.Length, 64);
        var buffer = stackalloc byte[max * NativeMemory.UffdMsgSize];
        // SAFETY: buffer holds max messages; read never writes more than the count given.
        var n = NativeMemory.Read(_fd, buffer, (nuint)(max * NativeMemory.UffdMsgSize));
        if (n < 0)
        {
            var err = Marshal.GetLastPInvokeError();
            if (err == NativeMemory.EAGAIN || err == NativeMemory.EINTR) return 0;
            throw new UserfaultfdException("read(userfaultfd)", err);
        }
        if (n == 0) throw new UserfaultfdException("read(userfaultfd) returned end of file");
        if (n % NativeMemory.UffdMsgSize != 0) throw new UserfaultfdException($"read(userfaultfd) returned {n} bytes, not whole uffd_msgs");
        var count = 0;
        for (var p = buffer; p < buffer + n; p += NativeMemory.UffdMsgSize)
        {
            if (p[0] != NativeMemory.UFFD_EVENT_PAGEFAULT) { ignored++; continue; }
            // SAFETY: p walks whole uffd_msg records inside the n bytes read (n is a multiple of their
            // size); flags, address and ptid are fields of the record at p.
            var flags = *(ulong*)(p + NativeMemory.UffdMsgFlagsOffset);
            var kind = (flags & NativeMemory.UFFD_PAGEFAULT_FLAG_WP) != 0 ? FaultKind.WriteProtect
                : (flags & NativeMemory.UFFD_PAGEFAULT_FLAG_MINOR) != 0 ? FaultKind.Minor
                : FaultKind.Missing;
            into[count++] = new UffdFault(
                *(ulong*)(p + NativeMemory.UffdMsgAddressOffset), kind,
                (flags & NativeMemory.UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                ThreadIds ? *(uint*)(p + NativeMemory.UffdMsgPtidOffset) : null);
        }
        return count;
    }

    /// <summary>Closes the fd. Blocked faulters wake and fault normally; unregister first to be explicit.</summary>
    public void Dispose()
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0) Native.Close(fd);
    }
}

/// <summary>
/// A thread that polls a <see cref="Userfaultfd"/> and hands each page fault to a callback (the
/// vmspace turns it into a message). Stopped by an eventfd, so <see cref="Dispose"/> returns
/// promptly; an error ends the thread after calling <c>onError</c> once.
/// </summary>
public sealed unsafe class UffdReader : IDisposable
{
    private readonly Userfaultfd _uffd;
    private readonly Action<UffdFault> _onFault;
    private readonly Action<Exception> _onError;
    private readonly Thread _thread;
    private int _stopFd;
    private long _ignoredEvents;

    public long IgnoredEvents => Interlocked.Read(ref _ignoredEvents);

    public UffdReader(Userfaultfd uffd, Action<UffdFault> onFault, Action<Exception> onError, string threadName = "uffd-reader")
    {
        _uffd = uffd;
        _onFault = onFault;
        _onError = onError;
        _stopFd = NativeMemory.EventFd(0, NativeMemory.EFD_CLOEXEC | NativeMemory.EFD_NONBLOCK);
        if (_stopFd < 0) throw new UserfaultfdException("eventfd", Marshal.GetLastPInvokeError());
        _thread = new Thread(Loop) { IsBackground = true, Name = threadName };
        _thread.Start();
    }

    private void Loop()
    {
        // SAFETY: pfds is two struct pollfd on this thread's frame, which the loop never leaves while
        // it polls; poll is told nfds = 2.
        Span<UffdFault> faults = stackalloc UffdFault[64];
        var pfds = stackalloc NativeMemory.PollFd[2];
        try
        {
            while (true)
            {
                pfds[0] = new NativeMemory.PollFd { Fd = _uffd.Fd, Events = NativeMemory.POLLIN };
                pfds[1] = new NativeMemory.PollFd { Fd = _stopFd, Events = NativeMemory.POLLIN };
                var r = NativeMemory.Poll(pfds, 2, -1);
                if (r < 0)
                {
                    var err = Marshal.GetLastPInvokeError();
                    if (err == NativeMemory.EINTR) continue;
                    throw new UserfaultfdException("poll(userfaultfd)", err);
                }
                if (pfds[1].Revents != 0) return;
                if ((pfds[0].Revents & (NativeMemory.POLLERR | NativeMemory.POLLNVAL | NativeMemory.POLLHUP)) != 0)
                    throw new UserfaultfdException($"poll(userfaultfd) reported revents 0x{pfds[0].Revents:X}");
                if ((pfds[0].Revents & NativeMemory.POLLIN) == 0) continue;
                var n = _uffd.ReadAvailable(faults, out var ignored);
                if (ignored > 0) Interlocked.Add(ref _ignoredEvents, ignored);
                for (var i = 0; i < n; i++) _onFault(faults[i]);
            }
        }
        catch (Exception e) when (Volatile.Read(ref _stopFd) >= 0)
        {
            _onError(e);
        }
    }

    public void Dispose()
    {
        var fd = _stopFd;
        if (fd < 0) return;
        ulong one = 1;
        // SAFETY: writes 8 bytes from a local to the eventfd.
        NativeMemory.Write(fd, &one, 8);
        if (Thread.CurrentThread != _thread) _thread.Join(TimeSpan.FromSeconds(5));
        _stopFd = -1;
        Native.Close(fd);
    }
}

/// <summary>
/// Paging operations on a <see cref="MemfdRegion"/>, for the vmspace: offsets are into the memfd
/// (the same in both views).
/// </summary>
public static class MemfdPaging
{
    private const ulong Page = 4096;

    private static void Check(MemfdRegion r, ulong offset, ulong length)
    {
        if ((offset | length) % Page != 0 || length == 0 || offset + length > r.Size || offset + length < offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"0x{offset:X}+0x{length:X} is not a page-aligned range of {r.Name}");
    }

    /// <summary>
    /// madvise(MADV_DONTNEED) on the guest view: drops this mapping's PTEs (a shared mapping keeps
    /// the pages in the memfd's page cache, so the next guest touch is a MINOR fault; a uffd-WP marker
    /// stays).
    /// </summary>
    public static void DropGuestMappings(this MemfdRegion r, ulong offset, ulong length)
    {
        Check(r, offset, length);
        if (NativeMemory.Madvise(r.GuestView + (nint)offset, (nuint)length, NativeMemory.MADV_DONTNEED) != 0)
            throw KvmException.Last($"madvise({r.Name}+0x{offset:X}, 0x{length:X}, MADV_DONTNEED)");
    }

    /// <summary>fallocate(PUNCH_HOLE|KEEP_SIZE): frees the pages from the memfd (both views lose
    /// them; the next guest touch is a MISSING fault).</summary>
    public static void PunchHole(this MemfdRegion r, ulong offset, ulong length)
    {
        Check(r, offset, length);
        if (NativeMemory.Fallocate(r.Fd, NativeMemory.FALLOC_FL_PUNCH_HOLE | NativeMemory.FALLOC_FL_KEEP_SIZE, (long)offset, (long)length) != 0)
            throw KvmException.Last($"fallocate({r.Name}+0x{offset:X}, 0x{length:X}, PUNCH_HOLE)");
    }

    /// <summary>The data ranges of the memfd within [offset, offset+length), by SEEK_DATA/SEEK_HOLE:
    /// pages with contents, in memory or in the host's swap. (A page fallocated but never written
    /// reads as a hole here, though st_blocks counts it: measured.)</summary>
    public static IEnumerable<(ulong Offset, ulong Length)> DataRanges(this MemfdRegion r, ulong offset, ulong length)
    {
        Check(r, offset, length);
        var end = offset + length;
        var at = offset;
        while (at < end)
        {
            var data = NativeMemory.Lseek(r.Fd, (long)at, NativeMemory.SEEK_DATA);
            if (data < 0)
            {
                if (Marshal.GetLastPInvokeError() == NativeMemory.ENXIO) yield break; // no data after 'at'
                throw KvmException.Last($"lseek({r.Name}, 0x{at:X}, SEEK_DATA)");
            }
            if ((ulong)data >= end) yield break;
            var hole = NativeMemory.Lseek(r.Fd, data, NativeMemory.SEEK_HOLE);
            if (hole < 0) throw KvmException.Last($"lseek({r.Name}, 0x{data:X}, SEEK_HOLE)");
            var stop = Math.Min((ulong)hole, end);
            yield return ((ulong)data, stop - (ulong)data);
            at = stop;
        }
    }
}
