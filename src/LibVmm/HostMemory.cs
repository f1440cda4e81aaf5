namespace ActorVmm.LibVmm;

/// <summary>Host memory for a VM could not be set up (a shared-memory file, locking memory).</summary>
public sealed class HostMemoryException(string message) : VmmException(message);

/// <summary>
/// Locking host memory into RAM (mlock): how a VM "wires" its guest memory. Locked pages are
/// allocated at once and never paged out, so nothing demand-pages or swaps them. The kernel limits
/// a process to RLIMIT_MEMLOCK locked bytes unless it has CAP_IPC_LOCK.
/// </summary>
public static unsafe class MemoryLock
{
    private const int CapIpcLock = 14;

    /// <summary>What this process may lock: RLIMIT_MEMLOCK's soft limit in bytes (<see cref="ulong.MaxValue"/>
    /// = unlimited), whether it has CAP_IPC_LOCK (no limit applies), and what it has locked already.</summary>
    public readonly record struct Allowance(ulong Limit, bool HasCapIpcLock, ulong Locked)
    {
        /// <summary>Why locking <paramref name="bytes"/> more would be refused, or null if it may go ahead.</summary>
        public string? Refusal(ulong bytes)
        {
            if (HasCapIpcLock || Limit == Native.RLIM_INFINITY || Locked + bytes <= Limit) return null;
            return $"wiring guest memory locks {Kib(bytes)} but RLIMIT_MEMLOCK allows {Kib(Limit)} ({Kib(Locked)} locked already): " +
                   "raise the limit (ulimit -l, LimitMEMLOCK= in a systemd unit) or give the process CAP_IPC_LOCK";
        }
    }

    private static string Kib(ulong bytes) => $"{bytes >> 10} KiB";

    /// <summary>This process's allowance, from getrlimit(2) and /proc/self/status (CapEff, VmLck).</summary>
    public static Allowance Current()
    {
        Native.RLimit limit;
        // SAFETY: limit is a local of the kernel's struct rlimit layout (two 64-bit words).
        if (Native.Getrlimit(Native.RLIMIT_MEMLOCK, &limit) != 0) throw KvmException.Last("getrlimit(RLIMIT_MEMLOCK)");
        var cap = false;
        var locked = 0UL;
        foreach (var line in File.ReadLines("/proc/self/status"))
        {
            if (line.StartsWith("CapEff:", StringComparison.Ordinal))
                cap = (Convert.ToUInt64(line[7..].Trim(), 16) & (1UL << CapIpcLock)) != 0;
            else if (line.StartsWith("VmLck:", StringComparison.Ordinal) &&
                     ulong.TryParse(line[6..].Trim().Split(' ')[0], out var kib))
                locked = kib << 10;
        }
        return new Allowance(limit.Current, cap, locked);
    }

    /// <summary>mlock(2): faults in and locks [address, address+length). Throws
    /// <see cref="HostMemoryException"/> naming <paramref name="what"/>, errno and the allowance.</summary>
    public static void Lock(nint address, ulong length, string what)
    {
        if (Native.Mlock(address, (nuint)length) == 0) return;
        var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
        var a = Current();
        var limit = a.Limit == Native.RLIM_INFINITY ? "unlimited" : Kib(a.Limit);
        throw new HostMemoryException($"cannot lock {what} ({Kib(length)}) into RAM: mlock: {Native.ErrorText(errno)} " +
                                      $"(RLIMIT_MEMLOCK {limit}, {Kib(a.Locked)} locked, CAP_IPC_LOCK {(a.HasCapIpcLock ? "yes" : "no")})");
    }
}

/// <summary>
/// Host memory a device shows the guest through a memslot — a passthru-style BAR, like QEMU's
/// ivshmem: a host file (other processes can read and write it) or an anonymous memfd, mapped once
/// MAP_SHARED. That one mapping is both the memslot and the host's view, so each side sees the
/// other's writes (a file's readers and writers share its page cache with the mapping).
/// </summary>
public sealed unsafe class SharedMemoryRegion : IDisposable
{
    private const ulong Page = 4096;

    /// <summary>The file's path, or "memfd:NAME".</summary>
    public string Name { get; }
    public ulong Size { get; }
    public nint Address { get; private set; }

    private SharedMemoryRegion(string name, ulong size, nint address)
    {
        Name = name;
        Size = size;
        Address = address;
    }

    /// <summary>
    /// Maps the file at <paramref name="path"/>. With <paramref name="size"/>, a missing file is
    /// created and a shorter one extended (with zeros) to that size, and the first
    /// <paramref name="size"/> bytes are mapped; without, the file must exist and its whole length
    /// is mapped. Sizes are positive multiples of 4 KiB.
    /// </summary>
    /// <exception cref="HostMemoryException">with a message a user can act on</exception>
    public static SharedMemoryRegion OpenFile(string path, ulong? size = null)
    {
        if (size is { } s && (s == 0 || s % Page != 0))
            throw new HostMemoryException($"shared memory {path}: size {s} is not a positive multiple of 4 KiB");
        if (size is null && !File.Exists(path))
            throw new HostMemoryException($"shared memory file {path} does not exist (give a size to create it)");
        Microsoft.Win32.SafeHandles.SafeFileHandle handle;
        try
        {
            handle = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.ReadWrite);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            throw new HostMemoryException($"shared memory file {path} cannot be opened: {e.Message}");
        }
        using (handle)
        {
            var fd = (int)handle.DangerousGetHandle();
            // SAFETY: stat is StatSize bytes, the kernel's struct stat, alive for the call; st_mode is
            // read at its offset inside it.
            var stat = stackalloc byte[Native.StatSize];
            // SAFETY: stat has the kernel's struct stat size; fd is open for the duration of the call.
            if (Native.Fstat(fd, stat) != 0) throw new HostMemoryException($"shared memory file {path}: fstat failed");
            const uint typeMask = 0xF000, regular = 0x8000;
            if ((*(uint*)(stat + StatModeOffset) & typeMask) != regular)
                throw new HostMemoryException($"shared memory file {path} is not a regular file");
            var length = (ulong)RandomAccess.GetLength(handle);
            ulong mapped;
            if (size is { } wanted)
            {
                if (length < wanted)
                {
                    try { RandomAccess.SetLength(handle, (long)wanted); }
                    catch (IOException e) { throw new HostMemoryException($"shared memory file {path} cannot grow to {wanted} bytes: {e.Message}"); }
                }
                mapped = wanted;
            }
            else
            {
                if (length == 0 || length % Page != 0)
                    throw new HostMemoryException($"shared memory file {path} is {length} bytes long, not a positive multiple of 4 KiB");
                mapped = length;
            }
            return new SharedMemoryRegion(path, mapped, Map(fd, mapped, path));
        }
    }

    /// <summary>An anonymous shared region (a memfd): only this process sees it.</summary>
    public static SharedMemoryRegion Anonymous(string name, ulong size)
    {
        if (size == 0 || size % Page != 0) throw new HostMemoryException($"shared memory {name}: size {size} is not a positive multiple of 4 KiB");
        var fd = Native.MemfdCreate("actorvmm-" + name, Native.MFD_CLOEXEC);
        if (fd < 0) throw new HostMemoryException($"memfd_create({name}) failed: {Native.ErrorText(System.Runtime.InteropServices.Marshal.GetLastPInvokeError())}");
        try
        {
            if (Native.Ftruncate(fd, (long)size) != 0) throw new HostMemoryException($"ftruncate({name}, {size}) failed");
            return new SharedMemoryRegion("memfd:" + name, size, Map(fd, size, name));
        }
        finally
        {
            Native.Close(fd); // the mapping keeps the memfd alive
        }
    }

    /// <summary>x86-64 <c>struct stat</c>: st_mode at 24.</summary>
    private const int StatModeOffset = 24;

    private static nint Map(int fd, ulong size, string what)
    {
        var p = Native.Mmap(0, (nuint)size, Native.PROT_READ | Native.PROT_WRITE, Native.MAP_SHARED, fd, 0);
        if (p == Native.MAP_FAILED)
            throw new HostMemoryException($"mmap of shared memory {what} ({size} bytes) failed: {Native.ErrorText(System.Runtime.InteropServices.Marshal.GetLastPInvokeError())}");
        return p;
    }

    /// <summary>The region as a span, for host-side reads and writes.</summary>
    public Span<byte> HostSpan(ulong offset, int length)
    {
        if (Address == 0) throw new ObjectDisposedException(Name);
        if (length < 0 || offset + (ulong)length > Size) throw new ArgumentOutOfRangeException(nameof(offset));
        // SAFETY: bounds checked above against the mapping's size; the mapping lives until Dispose.
        return new Span<byte>((byte*)Address + offset, length);
    }

    /// <summary>Wires the region: faults it in and locks it into RAM (see <see cref="MemoryLock"/>).</summary>
    public void Lock()
    {
        if (MemoryLock.Current().Refusal(Size) is { } why) throw new HostMemoryException($"shared memory {Name}: {why}");
        MemoryLock.Lock(Address, Size, $"shared memory {Name}");
    }

    public void Dispose()
    {
        if (Address != 0) Native.Munmap(Address, (nuint)Size);
        Address = 0;
    }
}
