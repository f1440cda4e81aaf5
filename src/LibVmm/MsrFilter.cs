using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm;

/// <summary>Which RDMSR/WRMSR failures KVM turns into KVM_EXIT_X86_RDMSR/WRMSR exits
/// (KVM_CAP_X86_USER_SPACE_MSR args[0], linux/kvm.h KVM_MSR_EXIT_REASON_*).</summary>
[Flags]
public enum MsrExitReasons : ulong
{
    None = 0,
    /// <summary>An access KVM would #GP on.</summary>
    Invalid = 0b001,
    /// <summary>An MSR KVM does not know.</summary>
    Unknown = 0b010,
    /// <summary>An access the MSR filter denies.</summary>
    Filter = 0b100,
}

/// <summary>Which accesses a filter range covers (KVM_MSR_FILTER_READ / _WRITE).</summary>
[Flags]
public enum MsrAccess : uint
{
    Read = 0b01,
    Write = 0b10,
}

/// <summary>
/// <paramref name="Count"/> MSRs from <paramref name="First"/> whose <paramref name="Access"/> is
/// denied, so it exits to user space (with <see cref="MsrExitReasons.Filter"/> enabled).
/// </summary>
public readonly record struct MsrDenyRange(uint First, uint Count, MsrAccess Access);

/// <summary>
/// KVM_X86_SET_MSR_FILTER: the MSRs whose RDMSR/WRMSR the VMM handles itself (the x2APIC
/// registers, IA32_TSC_DEADLINE and IA32_APIC_BASE when the local APIC is emulated in user space).
/// Layout per linux/kvm.h on x86-64 (checked with gcc): struct kvm_msr_filter is 392 bytes,
/// { u32 flags; struct kvm_msr_filter_range ranges[16]; } with each range 24 bytes:
/// { u32 flags; u32 nmsrs; u32 base; u8 *bitmap; }. A set bitmap bit allows the access, a clear
/// bit denies it; MSRs outside every range follow the filter's default (allow, here).
/// </summary>
public static unsafe class MsrFilter
{
    public const int MaxRanges = 16;
    private const int FilterSize = 392;
    private const int RangesOffset = 8;
    private const int RangeSize = 24;
    private const uint DefaultAllow = 0;

    /// <summary>KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) on the VM: these failures exit to user space.</summary>
    public static void EnableUserSpaceMsrExits(this VmHandle vm, MsrExitReasons reasons)
    {
        if (vm.System.CheckExtension(KvmCap.X86UserSpaceMsr) <= 0)
            throw new KvmException("KVM lacks KVM_CAP_X86_USER_SPACE_MSR: the local APIC's MSRs cannot be emulated in user space");
        vm.EnableCap(KvmCap.X86UserSpaceMsr, (ulong)reasons);
    }

    /// <summary>Installs a default-allow filter that denies <paramref name="ranges"/>.</summary>
    public static void SetMsrFilter(this VmHandle vm, IReadOnlyList<MsrDenyRange> ranges)
    {
        if (ranges.Count > MaxRanges) throw new ArgumentException($"at most {MaxRanges} MSR filter ranges", nameof(ranges));
        if (vm.System.CheckExtension(KvmCap.X86MsrFilter) <= 0)
            throw new KvmException("KVM lacks KVM_CAP_X86_MSR_FILTER");
        // All-zero bitmaps: every MSR of a range is denied. They must stay pinned during the ioctl.
        var bitmaps = new GCHandle[ranges.Count];
        var filter = new byte[FilterSize];
        try
        {
            // SAFETY: filter is pinned for the block and is FilterSize bytes, struct kvm_msr_filter;
            // each range is written inside it (i < MaxRanges); the bitmaps it points to stay pinned by
            // their GCHandles until after the ioctl.
            fixed (byte* f = filter)
            {
                *(uint*)f = DefaultAllow;
                for (var i = 0; i < ranges.Count; i++)
                {
                    var r = ranges[i];
                    if (r.Count == 0) throw new ArgumentException("an MSR filter range is empty", nameof(ranges));
                    var bitmap = new byte[(r.Count + 7) / 8];
                    bitmaps[i] = GCHandle.Alloc(bitmap, GCHandleType.Pinned);
                    var range = f + RangesOffset + i * RangeSize;
                    *(uint*)range = (uint)r.Access;
                    *(uint*)(range + 4) = r.Count;
                    *(uint*)(range + 8) = r.First;
                    *(nint*)(range + 16) = bitmaps[i].AddrOfPinnedObject();
                }
                if (Native.Ioctl(vm.Fd, KvmIoctl.X86SetMsrFilter, f) < 0) throw KvmException.Last("KVM_X86_SET_MSR_FILTER");
            }
        }
        finally
        {
            foreach (var h in bitmaps)
                if (h.IsAllocated) h.Free();
        }
    }
}
