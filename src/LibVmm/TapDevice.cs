using System.Runtime.InteropServices;
using System.Text;

namespace ActorVmm.LibVmm;

/// <summary>A TAP device that cannot be opened or set up; the message says why and what to check.</summary>
public sealed class TapException : VmmException
{
    public int Errno { get; }

    public TapException(string message, int errno) : base(message) => Errno = errno;
}

/// <summary>TUNSETOFFLOAD bits (<c>&lt;linux/if_tun.h&gt;</c> TUN_F_*): the offloads the reader of the
/// TAP accepts in the frames the kernel gives it. TSO bits take effect only with <see cref="Csum"/>.</summary>
[Flags]
public enum TapOffloads : uint
{
    None = 0,
    /// <summary>TUN_F_CSUM: frames may carry a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM).</summary>
    Csum = 0x01,
    /// <summary>TUN_F_TSO4: frames may be TCPv4 segmentation-offload frames (GSO_TCPV4).</summary>
    Tso4 = 0x02,
    /// <summary>TUN_F_TSO6: frames may be TCPv6 segmentation-offload frames (GSO_TCPV6).</summary>
    Tso6 = 0x04,
    /// <summary>TUN_F_TSO_ECN: TSO frames may have the ECN/CWR bit (GSO_ECN).</summary>
    TsoEcn = 0x08,
}

/// <summary>
/// A TAP network interface opened through /dev/net/tun (Linux Documentation/networking/tuntap.rst):
/// <c>IFF_TAP | IFF_NO_PI | IFF_VNET_HDR</c>, so each read(2) returns one Ethernet frame and each
/// write(2) sends one, both preceded by a virtio-net header of <see cref="VnetHeaderSize"/> bytes
/// (TUNSETVNETHDRSZ 12: <c>struct virtio_net_hdr_mrg_rxbuf</c>, the virtio 1.x header with
/// num_buffers; the kernel uses the first 10 bytes and skips the rest). On x86-64 the header is
/// little-endian, as virtio 1.x wants, without TUNSETVNETLE. The fd is non-blocking and close-on-exec.
///
/// The interface is created if it does not exist (needs CAP_NET_ADMIN) or attached to a persistent one
/// (needs CAP_NET_ADMIN or to be its owner); it is brought up, addressed and moved between network
/// namespaces by the host's tools (<c>ip link</c>), not here. A non-persistent interface disappears
/// with the last fd: <see cref="Dispose"/>.
/// </summary>
public sealed unsafe class TapDevice : IDisposable
{
    public const string CloneDevice = "/dev/net/tun";
    public const int VnetHeaderSize = 12;
    /// <summary>IFNAMSIZ (16) minus the terminating NUL.</summary>
    public const int MaxNameLength = 15;

    // <linux/if_tun.h>, x86-64 (_IOW('T', n, int)); checked with a gcc program.
    private const nuint TUNSETIFF = 0x4004_54CA;
    private const nuint TUNSETOFFLOAD = 0x4004_54D0;
    private const nuint TUNSETVNETHDRSZ = 0x4004_54D8;
    private const short IFF_TAP = 0x0002;
    private const short IFF_NO_PI = 0x1000;
    private const short IFF_VNET_HDR = 0x4000;
    /// <summary><c>struct ifreq</c>: 40 bytes, ifr_name[16] then the union (ifr_flags at 16).</summary>
    private const int IfreqSize = 40;
    private const int IfrFlagsOffset = 16;

    private const int EPERM = 1;
    private const int ENOENT = 2;
    private const int EINTR = 4;
    private const int ENXIO = 6;
    private const int EAGAIN = 11;
    private const int EACCES = 13;
    private const int EBUSY = 16;
    private const int ENODEV = 19;
    private const int EINVAL = 22;
    private const int EBADFD = 77;

    private int _fd;

    /// <summary>The interface name the kernel gave (the one asked for).</summary>
    public string Name { get; }

    /// <summary>The fd, for poll(2) by the owner; -1 once disposed.</summary>
    public int Fd => _fd;

    private TapDevice(int fd, string name)
    {
        _fd = fd;
        Name = name;
    }

    /// <summary>Why <paramref name="name"/> cannot name an interface (empty, longer than 15 bytes, or with
    /// '/', ':', whitespace or NUL, which the kernel's dev_valid_name refuses), or null.</summary>
    public static string? NameProblem(string name) =>
        string.IsNullOrEmpty(name) ? "a TAP name is required"
        : Encoding.UTF8.GetByteCount(name) > MaxNameLength ? $"TAP name \"{name}\" is longer than {MaxNameLength} bytes"
        : name is "." or ".." || name.Any(c => c is '/' or ':' or '\0' || char.IsWhiteSpace(c))
            ? $"TAP name \"{name}\" is not a valid interface name"
        : null;

    /// <summary>Whether a network interface named <paramref name="name"/> exists in the calling thread's
    /// network namespace (the one <see cref="Open"/> would attach in).</summary>
    public static bool InterfaceExists(string name) => NameProblem(name) is null && Native.IfNameToIndex(name) != 0;

    /// <summary>
    /// <see cref="Open"/> for an interface that must exist already (a VM attaches to the TAP its owner
    /// made, <c>ip tuntap add NAME mode tap</c>, and never creates one that would vanish with it): a
    /// missing one is a <see cref="TapException"/> (ENODEV) saying so.
    /// </summary>
    public static TapDevice OpenExisting(string name)
    {
        if (NameProblem(name) is { } problem) throw new TapException(problem, EINVAL);
        if (!InterfaceExists(name))
            throw new TapException($"TAP \"{name}\" does not exist in this network namespace (create it first: ip tuntap add {name} mode tap)", ENODEV);
        return Open(name);
    }

    /// <summary>
    /// Opens (creating if needed) the TAP interface <paramref name="name"/> with a 12-byte vnet header,
    /// non-blocking. Throws <see cref="TapException"/> naming the cause: no /dev/net/tun, no permission,
    /// the name held by another process or by an interface that is not a TAP, or a kernel without
    /// IFF_VNET_HDR. A name with a '%d' is not accepted: the VM's interface name is fixed by its owner.
    /// </summary>
    public static TapDevice Open(string name)
    {
        if (NameProblem(name) is { } problem) throw new TapException(problem, EINVAL);
        if (name.Contains('%')) throw new TapException($"TAP name \"{name}\" must not be a pattern", EINVAL);

        var fd = Native.Open(CloneDevice, Native.O_RDWR | NativeMemory.O_NONBLOCK | Native.O_CLOEXEC);
        if (fd < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            throw new TapException(errno switch
            {
                ENOENT or ENODEV or ENXIO => $"cannot open {CloneDevice}: {Native.ErrorText(errno)} (is the tun module loaded, and /dev/net/tun present in this container?)",
                EACCES or EPERM => $"cannot open {CloneDevice}: {Native.ErrorText(errno)} (needs read-write access to it)",
                _ => $"cannot open {CloneDevice}: {Native.ErrorText(errno)} (errno {errno})",
            }, errno);
        }
        try
        {
            SetInterface(fd, name);
            var size = VnetHeaderSize;
            // SAFETY: TUNSETVNETHDRSZ reads one int from the local `size`.
            if (Native.Ioctl(fd, TUNSETVNETHDRSZ, &size) != 0)
                throw Failed($"TUNSETVNETHDRSZ({VnetHeaderSize}) on TAP \"{name}\"", Marshal.GetLastPInvokeError());
            return new TapDevice(fd, name);
        }
        catch
        {
            Native.Close(fd);
            throw;
        }
    }

    private static void SetInterface(int fd, string name)
    {
        var ifr = stackalloc byte[IfreqSize];
        new Span<byte>(ifr, IfreqSize).Clear();
        Encoding.UTF8.GetBytes(name, new Span<byte>(ifr, MaxNameLength));
        *(short*)(ifr + IfrFlagsOffset) = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: ifr is a zeroed 40-byte struct ifreq on this frame; TUNSETIFF reads it and writes the
        // name back into it.
        if (Native.Ioctl(fd, TUNSETIFF, ifr) == 0) return;
        var errno = Marshal.GetLastPInvokeError();
        throw new TapException(errno switch
        {
            EBUSY => $"TAP \"{name}\" is in use: another process has it open (tuntap.rst: a non-multiqueue TAP has one reader)",
            EPERM => $"not permitted to create or attach TAP \"{name}\": needs CAP_NET_ADMIN, or a persistent TAP owned by this user (ip tuntap add {name} mode tap user ...)",
            EINVAL => $"cannot attach TAP \"{name}\": an interface of that name exists and is not a TAP with these flags (TUN, or created without vnet_hdr / with multi_queue)",
            _ => $"TUNSETIFF(\"{name}\", IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) failed: {Native.ErrorText(errno)} (errno {errno})",
        }, errno);
    }

    private static TapException Failed(string operation, int errno) =>
        new($"{operation} failed: {Native.ErrorText(errno)} (errno {errno})", errno);

    /// <summary>
    /// Reads the next frame (vnet header, then the Ethernet frame) into <paramref name="buffer"/>.
    /// Returns its full length, 0 if none is queued; a frame longer than the buffer is cut to it, and the
    /// length returned is still the frame's (the kernel reports it so), so a result above
    /// buffer.Length means "too long, truncated". Throws <see cref="TapException"/> for any other error.
    /// </summary>
    public int Read(Span<byte> buffer)
    {
        while (true)
        {
            nint n;
            fixed (byte* p = buffer)
            {
                // SAFETY: reads at most buffer.Length bytes into the pinned span.
                n = NativeMemory.Read(Live(), p, (nuint)buffer.Length);
            }
            if (n >= 0) return (int)n;
            var errno = Marshal.GetLastPInvokeError();
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return 0;
            throw Failed($"read from TAP \"{Name}\"", errno);
        }
    }

    /// <summary>
    /// Sends one frame (vnet header, then the Ethernet frame) in one write(2). Returns 0, or the errno
    /// when the kernel refused it (EINVAL: a header it cannot apply, such as a checksum offset outside the
    /// frame or an unknown GSO type; EIO: the interface is down; ENOMEM/ENOBUFS): a dropped frame, not
    /// an error of the device.
    /// </summary>
    public int Write(ReadOnlySpan<byte> frame)
    {
        while (true)
        {
            nint n;
            fixed (byte* p = frame)
            {
                // SAFETY: writes frame.Length bytes from the pinned span.
                n = NativeMemory.Write(Live(), p, (nuint)frame.Length);
            }
            if (n >= 0) return 0;
            var errno = Marshal.GetLastPInvokeError();
            if (errno != EINTR) return errno;
        }
    }

    /// <summary>TUNSETOFFLOAD: which offloads the frames this reader gets may use (tuntap.rst; the kernel
    /// finishes checksums and segments itself for what is not set).</summary>
    public void SetOffloads(TapOffloads offloads)
    {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if (Native.Ioctl(Live(), TUNSETOFFLOAD, (nint)(uint)offloads) != 0)
            throw Failed($"TUNSETOFFLOAD({offloads}) on TAP \"{Name}\"", Marshal.GetLastPInvokeError());
    }

    /// <summary>Waits up to <paramref name="timeoutMs"/> (-1: forever) for a frame to read. Throws
    /// <see cref="TapException"/> when the fd can never become readable again (poll's POLLERR: the
    /// interface was deleted under it).</summary>
    public bool WaitReadable(int timeoutMs)
    {
        var pfd = new NativeMemory.PollFd { Fd = Live(), Events = NativeMemory.POLLIN };
        while (true)
        {
            // SAFETY: one pollfd on this frame.
            var r = NativeMemory.Poll(&pfd, 1, timeoutMs);
            if (r > 0 && (pfd.Revents & NativeMemory.POLLIN) == 0
                && (pfd.Revents & (NativeMemory.POLLERR | NativeMemory.POLLHUP | NativeMemory.POLLNVAL)) != 0)
                throw new TapException($"TAP \"{Name}\" can no longer be read (poll: 0x{pfd.Revents:x}): its interface is gone", EBADFD);
            if (r >= 0) return r > 0 && (pfd.Revents & NativeMemory.POLLIN) != 0;
            var errno = Marshal.GetLastPInvokeError();
            if (errno != EINTR) throw Failed($"poll on TAP \"{Name}\"", errno);
        }
    }

    private int Live()
    {
        var fd = _fd;
        if (fd < 0) throw new ObjectDisposedException(nameof(TapDevice), $"TAP \"{Name}\" is closed");
        return fd;
    }

    /// <summary>Closes the fd; a TAP that is not persistent disappears with it.</summary>
    public void Dispose()
    {
        var fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0) Native.Close(fd);
    }
}
