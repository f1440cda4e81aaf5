namespace ActorVmm.Lapic;

/// <summary>What the emulated local APIC advertises and how its timer maps onto clock time.</summary>
public sealed record LapicOptions
{
    public static readonly LapicOptions Default = new();

    /// <summary>Frequency of the timer's input clock before the divider (the "bus clock").
    /// 1 GHz as in KVM (one count per nanosecond with divide-by-1); bhyve uses 128 MiHz.</summary>
    public long TimerFrequencyHz { get; init; } = 1_000_000_000;

    /// <summary>The guest's TSC frequency, for TSC-deadline mode: the guest's TSC at clock time t is
    /// <see cref="TscAtClockZero"/> + t × this. The VM builder reads both from KVM
    /// (KVM_GET_TSC_KHZ; IA32_TSC against the VM's clock), so a deadline the guest computes from
    /// RDTSC fires when its TSC gets there.</summary>
    public long TscFrequencyHz { get; init; } = 1_000_000_000;

    /// <summary>The guest's TSC when the VM's clock read zero (see <see cref="TscFrequencyHz"/>).</summary>
    public ulong TscAtClockZero { get; init; }

    /// <summary>IA32_APIC_BASE.EXTD may be set (CPUID.01H:ECX.x2APIC[bit 21]).</summary>
    public bool X2ApicSupported { get; init; } = true;

    /// <summary>LVT Timer mode 10b is valid (CPUID.01H:ECX.TSC_Deadline[bit 24]); else bit 18 is reserved.</summary>
    public bool TscDeadlineSupported { get; init; } = true;

    /// <summary>The BSP's LVT LINT0 resets to ExtINT, unmasked (virtual-wire mode, as a PC BIOS
    /// leaves it and as KVM's kvm_lapic_reset does), so the 8259's INTR reaches the BSP.</summary>
    public bool BspLint0ExtInt { get; init; }

    /// <summary>MAXPHYADDR: IA32_APIC_BASE bits at and above it are reserved.</summary>
    public int PhysicalAddressBits { get; init; } = 46;
}
