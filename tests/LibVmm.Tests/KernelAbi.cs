namespace ActorVmm.LibVmm.Tests;

/// <summary>
/// The kernel's truth for x86-64, printed by gcc (sizeof / offsetof / the ioctl macros) from
/// /usr/include/linux/kvm.h and glibc's signal.h. Hard-coded on purpose: LibVmm is compared
/// against these numbers, never against itself.
/// </summary>
internal static class KernelAbi
{
    // struct kvm_run
    public const int KvmRunSize = 2352;
    public const int RequestInterruptWindow = 0, ImmediateExit = 1, ExitReason = 8;
    public const int ReadyForInterruptInjection = 12, IfFlag = 13, Flags = 14, Cr8 = 16, ApicBase = 24;
    public const int IoDirection = 32, IoSize = 33, IoPort = 34, IoCount = 36, IoDataOffset = 40;
    public const int MmioPhysAddr = 32, MmioData = 40, MmioLen = 48, MmioIsWrite = 52;
    public const int MsrError = 32, MsrReason = 40, MsrIndex = 44, MsrData = 48;
    public const int InternalSuberror = 32, InternalNdata = 36, InternalData = 40;
    public const int FailEntryReason = 32, FailEntryCpu = 40;
    public const int SystemEventType = 32, SystemEventNdata = 36, SystemEventData = 40;
    public const int KvmValidRegs = 288, SyncRegs = 304;

    /// <summary>KVM_PIO_PAGE_OFFSET × 4096: where KVM puts port I/O data, after kvm_run.</summary>
    public const ulong PioPageOffset = 4096;

    // KVM_EXIT_*
    public const uint ExitIo = 2, ExitHlt = 5, ExitMmio = 6, ExitShutdown = 8, ExitFailEntry = 9, ExitIntr = 10;
    public const uint ExitInternalError = 17, ExitSystemEvent = 24, ExitX86Rdmsr = 29, ExitX86Wrmsr = 30;
    public const byte ExitIoIn = 0, ExitIoOut = 1;

    public const uint ExitDirtyRingFull = 31;

    // struct kvm_dirty_gfn (16 bytes) and the dirty ring's place in the vcpu mapping
    public const int DirtyGfnSize = 16, DirtyGfnFlags = 0, DirtyGfnSlot = 4, DirtyGfnOffset = 8;
    public const uint DirtyGfnFlagDirty = 1, DirtyGfnFlagReset = 2;
    public const long DirtyLogPageOffset = 64;
    public const uint CapDirtyLogRing = 192, CapDirtyLogRingAcqRel = 223;

    // glibc x86-64: struct stat's st_mode, struct rlimit, RLIMIT_MEMLOCK
    public const int StatMode = 24, RLimitSize = 16, RlimitMemlock = 8;

    // KVM_MSR_EXIT_REASON_*
    public const uint MsrExitReasonUnknown = 2, MsrExitReasonFilter = 4;
}
