namespace ActorVmm.Devices;

/// <summary>Fixed ports, addresses and GSIs of the ActorVmm PC platform, in one place.</summary>
public static class Platform
{
    public const ushort Com1Port = 0x3F8;
    public const ushort Com1Length = 8;
    public const uint Com1Gsi = 4;

    /// <summary>QEMU isa-debug-exit convention: a write of v ends the VM with status (v &lt;&lt; 1) | 1.</summary>
    public const ushort DebugExitPort = 0xF4;
    public const ushort DebugExitLength = 1;

    public const ushort I8042DataPort = 0x60;
    public const ushort I8042CommandPort = 0x64;
    public const uint KeyboardGsi = 1;

    /// <summary>Guest RAM below 4 GiB ends here at most; the MMIO hole follows up to 4 GiB.</summary>
    public const ulong MmioHoleStart = 0xC000_0000;
    public const ulong MmioHoleEnd = 0x1_0000_0000;
    public const ulong LocalApicBase = 0xFEE0_0000;
    public const ulong IoApicBase = 0xFEC0_0000;
    public const ulong IoApicLength = 0x1000;
    public const int IoApicPins = 24;

    /// <summary>The shared-memory device's window (a passthru-style BAR without a PCI bus): host
    /// memory mapped into the guest as a memslot at this fixed address, up to
    /// <see cref="SharedMemoryMaxSize"/> bytes, inside the MMIO hole below the IOAPIC.</summary>
    public const ulong SharedMemoryBase = 0xE000_0000;
    public const ulong SharedMemoryMaxSize = 0x1000_0000;

    /// <summary>8259 pair: master 0x20-0x21, slave 0xA0-0xA1, ELCR 0x4D0-0x4D1.</summary>
    public const ushort PicMasterPort = 0x20;
    public const ushort PicSlavePort = 0xA0;
    public const ushort PicLength = 2;
    public const ushort ElcrPort = 0x4D0;
    public const ushort ElcrLength = 2;

    /// <summary>8254 PIT counters 0-2 and control word at 0x40-0x43; port 0x61 holds counter 2's gate and OUT.</summary>
    public const ushort PitPort = 0x40;
    public const ushort PitLength = 4;
    public const ushort SystemControlPortB = 0x61;
    public const ushort SystemControlPortBLength = 1;

    /// <summary>CMOS/RTC index (0x70, bit 7 = NMI disable) and data (0x71) ports.</summary>
    public const ushort RtcPort = 0x70;
    public const ushort RtcLength = 2;

    /// <summary>ISA IRQs (8259 inputs). On the IOAPIC, IRQ 0 is pin 2 (an interrupt source override); the others are identity-mapped.</summary>
    public const int PitIrq = 0;
    public const int RtcIrq = 8;
    public const uint PitGsi = 2;
    public const uint RtcGsi = 8;

    /// <summary>QEMU's pc-testdev (behind the test-devices switch, off by default): a 32-bit scratch
    /// register at 0xE0-0xE3 (any access size) and again at 0xE8-0xEB (byte-wide), the flush-page
    /// port at 0xE4-0xE7, 24 interrupt lines at 0x2000-0x2017 and 64 KiB of MMIO RAM at 0xFF000000.</summary>
    public const ushort TestDevScratchPort = 0xE0;
    public const ushort TestDevFlushPort = 0xE4;
    public const ushort TestDevByteScratchPort = 0xE8;
    public const ushort TestDevPortLength = 4;
    public const ushort TestDevIrqPort = 0x2000;
    public const ushort TestDevIrqLines = 24;
    public const ulong TestDevIomemBase = 0xFF00_0000;
    public const ulong TestDevIomemLength = 0x1_0000;
}
