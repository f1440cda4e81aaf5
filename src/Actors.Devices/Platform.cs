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

    /// <summary>System Control Port A (PS/2 "port 92"): bit 0 fast reset, bit 1 alternate A20 gate.</summary>
    public const ushort SystemControlPortA = 0x92;
    public const ushort SystemControlPortALength = 1;

    /// <summary>The reset control register (Intel chipsets' RST_CNT), one byte at 0xCF9: the only
    /// byte of 0xCF8-0xCFF taken today. The rest is kept for PCI configuration mechanism #1
    /// (PCI Local Bus 3.0 §3.2.2.3.2): CONFIG_ADDRESS, a dword at <see cref="PciConfigAddressPort"/>
    /// (whose dword accesses start at 0xCF8, so they never reach the reset register), and
    /// CONFIG_DATA at <see cref="PciConfigDataPort"/>-0xCFF.</summary>
    public const ushort ResetControlPort = 0xCF9;
    public const ushort ResetControlLength = 1;
    public const ushort PciConfigAddressPort = 0xCF8;
    public const ushort PciConfigDataPort = 0xCFC;

    /// <summary>PCI Express enhanced configuration (ECAM, PCIe Base 4.0 §7.2.2): 4 KiB of configuration
    /// space per function at base + (bus &lt;&lt; 20 | device &lt;&lt; 15 | function &lt;&lt; 12); this
    /// platform has bus 0 only (the MCFG's bus range 0-0), so its ECAM is the first 1 MiB.</summary>
    public const ulong PciEcamBase = 0xC000_0000;
    public const ulong PciEcamLength = 0x10_0000;

    /// <summary>Where 32-bit memory BARs are placed (the root bridge's window in the DSDT's _CRS).</summary>
    public const ulong PciMmioWindowBase = 0xD000_0000;
    public const ulong PciMmioWindowLength = 0x1000_0000;

    /// <summary>Where I/O BARs are placed (the root bridge's I/O window in the DSDT's _CRS).</summary>
    public const ushort PciIoWindowBase = 0xC000;
    public const ushort PciIoWindowLength = 0x4000;

    /// <summary>The ACPI PM register block (ACPI 6.x §4.8), laid out as Intel's ICH9 and QEMU's
    /// q35 lay out theirs: PM1a_EVT_BLK (status, enable: 4 bytes) at the base, PM1a_CNT_BLK
    /// (2 bytes) at +4, PM_TMR_BLK (4 bytes) at +8. No PM1b, PM2 or GPE blocks. The FADT points
    /// here; its SCI is ISA IRQ <see cref="AcpiSciIrq"/>.</summary>
    public const ushort AcpiPmBase = 0x600;
    public const ushort AcpiPm1EventBlock = AcpiPmBase;
    public const ushort AcpiPm1EventLength = 4;
    public const ushort AcpiPm1ControlBlock = AcpiPmBase + 4;
    public const ushort AcpiPm1ControlLength = 2;
    public const ushort AcpiPmTimerBlock = AcpiPmBase + 8;
    public const ushort AcpiPmTimerLength = 4;
    public const ushort AcpiPmLength = 12;
    public const int AcpiSciIrq = 9;

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
