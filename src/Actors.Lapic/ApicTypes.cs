using ActorVmm.Devices;

namespace ActorVmm.Lapic;

public enum DestinationMode : byte { Physical = 0, Logical = 1 }

public enum TriggerMode : byte { Edge = 0, Level = 1 }

/// <summary>ICR bits 19:18 (SDM §10.6.1).</summary>
public enum Shorthand : byte { None = 0, Self = 1, AllIncludingSelf = 2, AllExcludingSelf = 3 }

/// <summary>What IA32_APIC_BASE.EN / EXTD select (SDM §10.12.1, Table 10-5).</summary>
public enum ApicMode : byte { Disabled, XApic, X2Apic }

/// <summary>LVT Timer bits 18:17 (SDM §10.5.4, Table 10-2).</summary>
public enum TimerMode : byte { OneShot = 0, Periodic = 1, TscDeadline = 2 }

/// <summary>Events for the vcpu that are not IRR deliveries: the caller of the model turns them
/// into whatever makes the vcpu act (an NMI injection, INIT/wait-for-SIPI, INTA from the PIC).</summary>
public enum VcpuEventKind : byte { Nmi, Smi, Init, StartUp, ExtInt }

/// <summary>
/// An interrupt message sent by a write to the ICR (xAPIC low word, x2APIC 64-bit MSR 0x830).
/// <see cref="Destination"/> is ICR bits 63:56 in xAPIC mode and bits 63:32 in x2APIC mode, and
/// means nothing with a shorthand. Self-only IPIs never leave the APIC and are not sent as this.
/// </summary>
public sealed record Ipi(
    int SourceId,
    byte Vector,
    DeliveryMode Mode,
    DestinationMode DestinationMode,
    bool Level,
    TriggerMode TriggerMode,
    Shorthand Shorthand,
    uint Destination);

/// <summary>Register offsets in the xAPIC page (SDM Vol 3A Table 10-1). In x2APIC mode the register
/// at offset <c>o</c> is MSR <c>0x800 + (o &gt;&gt; 4)</c> (Table 10-6).</summary>
public static class ApicOffsets
{
    public const int Id = 0x020;
    public const int Version = 0x030;
    public const int Tpr = 0x080;
    public const int Apr = 0x090;
    public const int Ppr = 0x0A0;
    public const int Eoi = 0x0B0;
    public const int Rrd = 0x0C0;
    public const int Ldr = 0x0D0;
    public const int Dfr = 0x0E0;
    public const int Svr = 0x0F0;
    /// <summary>ISR, TMR, IRR: eight 32-bit registers each, 16 bytes apart, vectors 0..255.</summary>
    public const int Isr = 0x100;
    public const int Tmr = 0x180;
    public const int Irr = 0x200;
    public const int Esr = 0x280;
    public const int LvtCmci = 0x2F0;
    public const int IcrLow = 0x300;
    public const int IcrHigh = 0x310;
    public const int LvtTimer = 0x320;
    public const int LvtThermal = 0x330;
    public const int LvtPerfMon = 0x340;
    public const int LvtLint0 = 0x350;
    public const int LvtLint1 = 0x360;
    public const int LvtError = 0x370;
    public const int TimerInitialCount = 0x380;
    public const int TimerCurrentCount = 0x390;
    public const int TimerDivide = 0x3E0;
    /// <summary>x2APIC only (MSR 0x83F).</summary>
    public const int SelfIpi = 0x3F0;

    /// <summary>The offset of the bitmap register holding <paramref name="vector"/> (ISR/TMR/IRR base).</summary>
    public static int VectorRegister(int bitmapBase, int vector) => bitmapBase + (vector >> 5) * 0x10;
}

/// <summary>MSRs the local APIC answers.</summary>
public static class ApicMsrs
{
    public const uint ApicBase = 0x1B;
    public const uint TscDeadline = 0x6E0;
    /// <summary>First and last x2APIC register MSR (SDM §10.12.1.2).</summary>
    public const uint X2ApicFirst = 0x800;
    public const uint X2ApicLast = 0x8FF;
    public const uint X2ApicIcr = 0x830;
    public const uint X2ApicSelfIpi = 0x83F;

    /// <summary>The x2APIC MSR of the register at xAPIC <paramref name="offset"/>.</summary>
    public static uint ForOffset(int offset) => X2ApicFirst + (uint)(offset >> 4);
}

/// <summary>Error Status Register bits (SDM §10.5.3, Figure 10-9).</summary>
[Flags]
public enum ApicError : uint
{
    None = 0,
    SendChecksum = 0b0000_0001,
    ReceiveChecksum = 0b0000_0010,
    SendAccept = 0b0000_0100,
    ReceiveAccept = 0b0000_1000,
    RedirectableIpi = 0b0001_0000,
    SendIllegalVector = 0b0010_0000,
    ReceivedIllegalVector = 0b0100_0000,
    IllegalRegisterAddress = 0b1000_0000,
}
