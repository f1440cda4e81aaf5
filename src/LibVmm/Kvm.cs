namespace ActorVmm.LibVmm;

/// <summary>
/// The /dev/kvm system handle: API version, capabilities, supported CPUID, VM creation.
/// </summary>
public sealed unsafe class Kvm : IDisposable
{
    public const string DefaultPath = "/dev/kvm";
    public const int ExpectedApiVersion = 12;

    /// <summary>What a VM of this project cannot do without.</summary>
    public static readonly KvmCap[] RequiredCapabilities =
    [
        KvmCap.UserMemory, KvmCap.SetTssAddr, KvmCap.ExtCpuid, KvmCap.ImmediateExit,
    ];

    private int _fd;

    public int Fd => _fd;
    public int VcpuMmapSize { get; }

    private Kvm(int fd)
    {
        _fd = fd;
        VcpuMmapSize = Native.Ioctl(fd, KvmIoctl.GetVcpuMmapSize, 0);
        if (VcpuMmapSize >= KvmRunView.Size) return;
        // Open never gets this object, so close the fd here; report errno only if the ioctl failed.
        var e = VcpuMmapSize < 0
            ? KvmException.Last("KVM_GET_VCPU_MMAP_SIZE")
            : new KvmException($"KVM_GET_VCPU_MMAP_SIZE is {VcpuMmapSize}, smaller than kvm_run ({KvmRunView.Size} bytes)");
        Native.Close(fd);
        _fd = -1;
        throw e;
    }

    /// <summary>Why KVM cannot be used here, or null if /dev/kvm opens and has what we need.</summary>
    /// <summary>
    /// This host's KVM is kvm_pvm (software nested virtualization, DESIGN §4), which has quirks the
    /// VMM works around. One: after an interrupt wakes a vcpu halted in the kernel, the EOI of a
    /// level-triggered vector (split irqchip) requests KVM_EXIT_IOAPIC_EOI but the request is acted
    /// on only at the next full guest entry, which a vcpu that halts again never makes.
    /// </summary>
    public static bool IsPvm { get; } = Directory.Exists("/sys/module/kvm_pvm");

    public static string? Unavailability(string path = DefaultPath)
    {
        if (!File.Exists(path)) return $"{path} does not exist (no KVM on this host)";
        try
        {
            using var kvm = Open(path);
            return null;
        }
        catch (KvmException e)
        {
            return e.Message;
        }
    }

    /// <summary>Opens /dev/kvm and checks the API version and <see cref="RequiredCapabilities"/>.</summary>
    /// <exception cref="KvmException">with a message a user can act on</exception>
    public static Kvm Open(string path = DefaultPath)
    {
        var fd = Native.Open(path, Native.O_RDWR | Native.O_CLOEXEC);
        if (fd < 0)
        {
            var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
            var hint = errno switch
            {
                Native.ENOENT => " (no KVM on this host: is the kvm module loaded?)",
                Native.EACCES => " (permission denied: add the user to the kvm group)",
                Native.ENODEV or Native.ENXIO => " (the KVM device exists but no hypervisor module is bound)",
                _ => "",
            };
            throw new KvmException($"open {path} failed: {Native.ErrorText(errno)}{hint}");
        }
        var version = Native.Ioctl(fd, KvmIoctl.GetApiVersion, 0);
        if (version != ExpectedApiVersion)
        {
            Native.Close(fd);
            throw new KvmException($"KVM API version {version}, expected {ExpectedApiVersion}");
        }
        var kvm = new Kvm(fd);
        foreach (var cap in RequiredCapabilities)
        {
            if (kvm.CheckExtension(cap) <= 0)
            {
                kvm.Dispose();
                throw new KvmException($"KVM lacks the required capability {cap} (KVM_CAP {(uint)cap})");
            }
        }
        return kvm;
    }

    public int ApiVersion => Native.Ioctl(_fd, KvmIoctl.GetApiVersion, 0);

    /// <summary>KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value.</summary>
    public int CheckExtension(KvmCap cap) => Math.Max(0, Native.Ioctl(_fd, KvmIoctl.CheckExtension, (nint)(uint)cap));

    /// <summary>KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits.</summary>
    public KvmCpuidEntry2[] GetSupportedCpuid()
    {
        for (var n = 64; n <= 4096; n *= 2)
        {
            var bytes = 8 + n * sizeof(KvmCpuidEntry2);
            var buffer = new byte[bytes];
            // SAFETY: buffer is pinned for the block and holds struct kvm_cpuid2: the count (nent) in
            // its first 4 bytes, then n entries; KVM writes at most nent entries and reports their
            // number in nent, which never exceeds n.
            fixed (byte* p = buffer)
            {
                *(uint*)p = (uint)n;
                if (Native.Ioctl(_fd, KvmIoctl.GetSupportedCpuid, p) == 0)
                {
                    var count = *(uint*)p;
                    var entries = new KvmCpuidEntry2[count];
                    var src = (KvmCpuidEntry2*)(p + 8);
                    for (var i = 0; i < count; i++) entries[i] = src[i];
                    return entries;
                }
                var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
                if (errno != Native.E2BIG) throw new KvmException("KVM_GET_SUPPORTED_CPUID", errno);
            }
        }
        throw new KvmException("KVM_GET_SUPPORTED_CPUID: more than 4096 entries");
    }

    /// <summary>KVM_CREATE_VM (default machine type).</summary>
    public VmHandle CreateVm()
    {
        var fd = Native.Ioctl(_fd, KvmIoctl.CreateVm, 0);
        if (fd < 0) throw KvmException.Last("KVM_CREATE_VM");
        return new VmHandle(this, fd);
    }

    public void Dispose()
    {
        if (_fd > 0) Native.Close(_fd);
        _fd = -1;
    }
}
