namespace ActorVmm.LibVmm;

/// <summary>ioctl request numbers of linux/kvm.h, built the way the kernel's _IO/_IOR/_IOW/_IOWR do.</summary>
internal static class KvmIoctl
{
    private const uint KVMIO = 0xAE;
    private const uint None = 0, Write = 1, Read = 2;

    private static nuint Ioc(uint dir, uint nr, uint size) => (nuint)((dir << 30) | (size << 16) | (KVMIO << 8) | nr);
    private static nuint Io(uint nr) => Ioc(None, nr, 0);
    private static nuint Ior(uint nr, uint size) => Ioc(Read, nr, size);
    private static nuint Iow(uint nr, uint size) => Ioc(Write, nr, size);
    private static nuint Iowr(uint nr, uint size) => Ioc(Read | Write, nr, size);

    // System ioctls.
    public static readonly nuint GetApiVersion = Io(0x00);
    public static readonly nuint CreateVm = Io(0x01);
    public static readonly nuint GetMsrIndexList = Iowr(0x02, 4);
    public static readonly nuint CheckExtension = Io(0x03);
    public static readonly nuint GetVcpuMmapSize = Io(0x04);
    public static readonly nuint GetSupportedCpuid = Iowr(0x05, 8);

    // VM ioctls.
    public static readonly nuint CreateVcpu = Io(0x41);
    public static readonly nuint GetDirtyLog = Iow(0x42, 16);
    public static readonly nuint SetUserMemoryRegion = Iow(0x46, 32);
    public static readonly nuint ClearDirtyLog = Iowr(0xC0, 24);
    public static readonly nuint SetTssAddr = Io(0x47);
    public static readonly nuint SetIdentityMapAddr = Iow(0x48, 8);
    public static readonly nuint EnableCap = Iow(0xA3, 104);
    public static readonly nuint X86SetMsrFilter = Iow(0xC6, 392);
    public static readonly nuint SetGsiRouting = Iow(0x6A, 8);
    public static readonly nuint SignalMsi = Iow(0xA5, 32);
    public static readonly nuint ResetDirtyRings = Io(0xC7);

    // Vcpu ioctls.
    public static readonly nuint Run = Io(0x80);
    public static readonly nuint GetRegs = Ior(0x81, 144);
    public static readonly nuint SetRegs = Iow(0x82, 144);
    public static readonly nuint GetSregs = Ior(0x83, 312);
    public static readonly nuint SetSregs = Iow(0x84, 312);
    public static readonly nuint Translate = Iowr(0x85, 24);
    public static readonly nuint Interrupt = Iow(0x86, 4);
    public static readonly nuint GetMsrs = Iowr(0x88, 8);
    public static readonly nuint SetMsrs = Iow(0x89, 8);
    public static readonly nuint SetCpuid2 = Iow(0x90, 8);
    public static readonly nuint GetFpu = Ior(0x8C, 416);
    public static readonly nuint SetFpu = Iow(0x8D, 416);
    public static readonly nuint Nmi = Io(0x9A);
    public static readonly nuint GetTscKhz = Io(0xA3);
    public static readonly nuint GetLapic = Ior(0x8E, 1024);
    public static readonly nuint SetLapic = Iow(0x8F, 1024);
    public static readonly nuint GetMpState = Ior(0x98, 4);
    public static readonly nuint SetMpState = Iow(0x99, 4);
}

/// <summary>KVM_CAP_* numbers this project asks about.</summary>
public enum KvmCap : uint
{
    Irqchip = 0,
    Hlt = 1,
    UserMemory = 3,
    SetTssAddr = 4,
    ExtCpuid = 7,
    NrVcpus = 9,
    NrMemslots = 10,
    SetIdentityMapAddr = 37,
    ImmediateExit = 136,
    X86UserSpaceMsr = 188,
    X86MsrFilter = 189,
    MaxVcpus = 66,
    ReadonlyMem = 81,
    SplitIrqchip = 121,
    /// <summary>KVM's local APIC has the TSC-deadline timer mode (user space sets CPUID.01H:ECX[24] itself).</summary>
    TscDeadlineTimer = 72,
    IrqRouting = 25,
    SignalMsi = 77,
    ManualDirtyLogProtect2 = 168,
    /// <summary>Per-vcpu dirty rings; KVM_CHECK_EXTENSION gives the largest ring in bytes.</summary>
    DirtyLogRing = 192,
    /// <summary>The same rings, with acquire/release ordering on the entries' flags required of user space.</summary>
    DirtyLogRingAcqRel = 223,
    /// <summary>KVM_GET_CLOCK / KVM_SET_CLOCK; KVM_CHECK_EXTENSION gives the KVM_CLOCK_* flags they support.</summary>
    AdjustClock = 39,
    VcpuEvents = 41,
    DebugRegs = 50,
    Xsave = 55,
    Xcrs = 56,
    /// <summary>KVM_{HAS,GET,SET}_DEVICE_ATTR on a vcpu fd (the TSC offset, KVM_VCPU_TSC_OFFSET).</summary>
    VcpuAttributes = 127,
}

/// <summary>KVM_EXIT_* reasons.</summary>
public enum KvmExitReason : uint
{
    Unknown = 0,
    Exception = 1,
    Io = 2,
    Hypercall = 3,
    Debug = 4,
    Hlt = 5,
    Mmio = 6,
    IrqWindowOpen = 7,
    Shutdown = 8,
    FailEntry = 9,
    Intr = 10,
    SetTpr = 11,
    TprAccess = 12,
    Nmi = 16,
    InternalError = 17,
    SystemEvent = 24,
    IoapicEoi = 26,
    X86Rdmsr = 29,
    X86Wrmsr = 30,
    DirtyRingFull = 31,
}

/// <summary>KVM_MP_STATE_* (kvm_mp_state.mp_state): kept by KVM only with an in-kernel local APIC.</summary>
public enum KvmMpState : uint
{
    Runnable = 0,
    Uninitialized = 1,
    InitReceived = 2,
    Halted = 3,
    SipiReceived = 4,
}

/// <summary>ioctl numbers of the vcpu and VM state a snapshot saves (linux/kvm.h); sizes checked in
/// tests/LibVmm.Tests against gcc's sizeof of the kernel structs.</summary>
internal static class KvmStateIoctl
{
    private const uint KVMIO = 0xAE;
    private const uint Write = 1, Read = 2;

    private static nuint Ioc(uint dir, uint nr, uint size) => (nuint)((dir << 30) | (size << 16) | (KVMIO << 8) | nr);

    // VM ioctls (KVM_CAP_ADJUST_CLOCK): struct kvm_clock_data, 48 bytes.
    public static readonly nuint SetClock = Ioc(Write, 0x7B, 48);
    public static readonly nuint GetClock = Ioc(Read, 0x7C, 48);

    // Vcpu ioctls.
    public static readonly nuint GetCpuid2 = Ioc(Read | Write, 0x91, 8);
    public static readonly nuint GetVcpuEvents = Ioc(Read, 0x9F, 64);
    public static readonly nuint SetVcpuEvents = Ioc(Write, 0xA0, 64);
    public static readonly nuint GetDebugRegs = Ioc(Read, 0xA1, 128);
    public static readonly nuint SetDebugRegs = Ioc(Write, 0xA2, 128);
    public static readonly nuint GetXsave = Ioc(Read, 0xA4, 4096);
    public static readonly nuint SetXsave = Ioc(Write, 0xA5, 4096);
    public static readonly nuint GetXcrs = Ioc(Read, 0xA6, 392);
    public static readonly nuint SetXcrs = Ioc(Write, 0xA7, 392);
    // On a vcpu fd, group KVM_VCPU_TSC_CTRL (KVM_CAP_VCPU_ATTRIBUTES): struct kvm_device_attr, 24 bytes.
    public static readonly nuint SetDeviceAttr = Ioc(Write, 0xE1, 24);
    public static readonly nuint GetDeviceAttr = Ioc(Write, 0xE2, 24);
    public static readonly nuint HasDeviceAttr = Ioc(Write, 0xE3, 24);
}
