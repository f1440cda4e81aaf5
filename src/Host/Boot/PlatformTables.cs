using System.Buffers.Binary;
using System.Text;
using ActorVmm.Devices;
using ActorVmm.Devices.Pci;
using ActorVmm.LibVmm;

namespace ActorVmm.Host.Boot;

/// <summary>
/// The tables a PC firmware leaves for an OS to find its processors and interrupt routing, for
/// boot images that are not firmware: the Intel MultiProcessor Specification 1.4 table ("MP"
/// below) and the ACPI RSDP/RSDT/XSDT with a MADT (ACPI 6.x §5.2.5-5.2.12). Pure functions over
/// <see cref="IGuestMemory"/>; everything sits in the BIOS area at <see cref="Base"/>:
/// <list type="bullet">
/// <item>0xF0000: MP floating pointer "_MP_" (MP §4.1), then the MP configuration table "PCMP"
/// (MP §4.2): one processor entry per vcpu (APIC ID = vcpu id, BSP flag on vcpu 0), bus entries
/// "PCI" (bus ID 0: a PCI bus's ID is its bus number, MP §D.3) and "ISA" (bus ID 1), one IOAPIC
/// entry, I/O interrupt entries for ISA IRQs 0-15 except the cascade IRQ 2 (IRQ 0 → INTIN 2,
/// others identity; conforming polarity and trigger) and for INTA#-INTD# of every bus-0 slot (the
/// _PRT's routing: level, active low), and the local interrupt entries ExtINT → LINT0, NMI → LINT1
/// of every local APIC (virtual wire).</item>
/// <item>0xF0800: RSDP "RSD PTR " revision 2 (16-byte aligned, inside 0xE0000-0xFFFFF), then
/// RSDT and XSDT (each listing the MADT, the FADT and the MCFG), the MADT "APIC": one Processor Local APIC
/// entry per vcpu, one I/O APIC entry (GSI base 0), interrupt source overrides ISA IRQ 0 → GSI 2
/// and the SCI (IRQ 9, level, active high), and a local APIC NMI on LINT1.</item>
/// <item>0xF0A00: the FADT "FACP" (§5.2.9, revision 6.5): the ACPI PM block at
/// <see cref="Platform.AcpiPmBase"/> (PM1a event and control, 24-bit PM timer) in both its 32-bit
/// and its Generic Address (X_) fields, SCI on IRQ 9, no SMI command port (always in ACPI mode),
/// the reset register (I/O 0xCF9, value 0x06), the 8042 and legacy devices, no VGA.</item>
/// <item>0xF0B40: the FACS (§5.2.10), 64-byte aligned: no waking vector, no global lock owner.</item>
/// <item>0xF0B80: the MCFG (PCI Firmware 3.2 §4.1.2): ECAM at <see cref="Platform.PciEcamBase"/>,
/// segment 0, buses 0-0.</item>
/// <item>0xF0C00: the DSDT (§5.2.11.1): <c>\_S5</c>, the S5 sleep type the PM block powers off on;
/// the PCI root bridge <c>\_SB.PCI0</c> with its windows and a _PRT routing every slot's INTx to
/// GSIs <see cref="PciIntxGsiBase"/>-19; the ECAM range as a motherboard resource; COM1, the RTC
/// and the 8042 keyboard as ISA devices (see <see cref="DsdtAml"/>).</item>
/// </list>
/// Every checksum makes its structure sum to zero (mod 256).
/// </summary>
public static class PlatformTables
{
    public const ulong Base = 0xF0000;
    public const ulong MpFloatingPointer = Base;
    public const ulong MpConfigTable = Base + 0x10;
    public const ulong Rsdp = Base + 0x800;
    public const ulong Rsdt = Rsdp + 0x40;
    public const ulong Xsdt = Rsdp + 0x80;
    public const ulong Madt = Rsdp + 0x100;
    public const ulong Fadt = Rsdp + 0x200;
    public const ulong Facs = Rsdp + 0x340;
    public const ulong Mcfg = Rsdp + 0x380;
    public const ulong Dsdt = Rsdp + 0x400;
    /// <summary>The tables end below here (the DSDT, last, grows with its _PRT); the e820 map reserves
    /// the whole BIOS area 0xF0000-0xFFFFF.</summary>
    public const ulong End = Base + 0x2000;

    public const byte LocalApicVersion = 0x14;
    public const byte IoApicVersion = 0x20;

    private const string OemId = "ACTVMM";
    private const int MaxCpus = 16;

    /// <summary>Writes the MP and ACPI tables. Throws <see cref="BootException"/> when guest RAM does not cover the BIOS area.</summary>
    public static void Write(IGuestMemory memory, int cpus, byte ioApicId)
    {
        if (cpus is < 1 or > MaxCpus) throw new ArgumentOutOfRangeException(nameof(cpus), $"1..{MaxCpus} vcpus");
        if (!memory.IsMapped(new GuestPhysAddr(Base), End - Base))
            throw new BootException($"guest RAM does not cover the BIOS area at 0x{Base:X} for the MP and ACPI tables");
        memory.Write(new GuestPhysAddr(Base), new byte[End - Base]);
        memory.Write(new GuestPhysAddr(MpConfigTable), MpConfiguration(cpus, ioApicId));
        memory.Write(new GuestPhysAddr(MpFloatingPointer), MpFloating((uint)MpConfigTable));
        memory.Write(new GuestPhysAddr(Madt), MadtTable(cpus, ioApicId));
        memory.Write(new GuestPhysAddr(Mcfg), McfgTable());
        memory.Write(new GuestPhysAddr(Dsdt), DsdtTable());
        memory.Write(new GuestPhysAddr(Facs), FacsStructure());
        memory.Write(new GuestPhysAddr(Fadt), FadtTable(Facs, Dsdt));
        memory.Write(new GuestPhysAddr(Rsdt), RsdtTable([(uint)Madt, (uint)Fadt, (uint)Mcfg]));
        memory.Write(new GuestPhysAddr(Xsdt), XsdtTable([Madt, Fadt, Mcfg]));
        memory.Write(new GuestPhysAddr(Rsdp), RsdpStructure((uint)Rsdt, Xsdt));
    }

    // ---- MP (Intel MultiProcessor Specification 1.4) ----

    /// <summary>MP floating pointer structure (MP §4.1, Table 4-1): 16 bytes, feature bytes 0 = a
    /// configuration table is present, IMCR absent (virtual wire mode).</summary>
    public static byte[] MpFloating(uint configTable)
    {
        var b = new byte[16];
        Ascii(b, 0, "_MP_");
        U32(b, 4, configTable);
        b[8] = 1;   // length in 16-byte paragraphs
        b[9] = 4;   // spec revision 1.4
        b[10] = Checksum(b);
        return b;
    }

    public const byte MpProcessor = 0, MpBus = 1, MpIoApic = 2, MpIoInterrupt = 3, MpLocalInterrupt = 4;

    /// <summary>MP bus IDs: PCI bus 0 has ID 0 (a PCI bus's ID is its bus number, MP §D.3); ISA is next.</summary>
    public const byte MpPciBus = 0, MpIsaBus = 1;

    /// <summary>MP interrupt entry flags (Table 4-7): polarity active low (bits 1:0 = 11) and
    /// trigger level (bits 3:2 = 11), as PCI interrupts are.</summary>
    public const ushort MpActiveLowLevel = 0b1111;

    /// <summary>MP configuration table (MP §4.2-4.3): header "PCMP" and the base entries, sorted by type.</summary>
    public static byte[] MpConfiguration(int cpus, byte ioApicId)
    {
        var entries = new List<byte[]>();
        for (var i = 0; i < cpus; i++)
        {
            // Processor entry (Table 4-4): EN, BP on vcpu 0; signature family 6; features: FPU, APIC on chip.
            var p = new byte[20];
            p[0] = MpProcessor;
            p[1] = (byte)i;
            p[2] = LocalApicVersion;
            p[3] = (byte)(0b01 | (i == 0 ? 0b10 : 0));
            U32(p, 4, 0x600);
            U32(p, 8, 0b10_0000_0001);
            entries.Add(p);
        }
        foreach (var (id, type) in new[] { (MpPciBus, "PCI   "), (MpIsaBus, "ISA   ") })
        {
            var bus = new byte[8];
            bus[0] = MpBus;
            bus[1] = id;
            Ascii(bus, 2, type);
            entries.Add(bus);
        }

        var ioapic = new byte[8];
        ioapic[0] = MpIoApic;
        ioapic[1] = ioApicId;
        ioapic[2] = IoApicVersion;
        ioapic[3] = 0b1; // EN
        U32(ioapic, 4, (uint)Platform.IoApicBase);
        entries.Add(ioapic);

        for (var irq = 0; irq < 16; irq++)
        {
            if (irq == 2) continue; // the 8259 cascade: IRQ 0 uses INTIN 2
            entries.Add(InterruptEntry(MpIoInterrupt, type: 0, flags: 0, MpIsaBus, sourceIrq: (byte)irq, destination: ioApicId,
                input: (byte)(irq == Platform.PitIrq ? Platform.PitGsi : (uint)irq)));
        }
        // PCI INTx (MP §D.3): the source bus IRQ is the device number in bits 6:2 and the pin in
        // bits 1:0 (0 = INTA#), routed as the _PRT says.
        for (var slot = 0; slot < PciSlots; slot++)
            for (var pin = 0; pin < PciIntxLines; pin++)
                entries.Add(InterruptEntry(MpIoInterrupt, type: 0, MpActiveLowLevel, MpPciBus, sourceIrq: (byte)(slot << 2 | pin),
                    destination: ioApicId, input: (byte)PciIntxGsi(slot, pin)));
        // Local interrupts of every local APIC (destination 0xFF): ExtINT on LINT0, NMI on LINT1.
        entries.Add(InterruptEntry(MpLocalInterrupt, type: 3, flags: 0, MpIsaBus, sourceIrq: 0, destination: 0xFF, input: 0));
        entries.Add(InterruptEntry(MpLocalInterrupt, type: 1, flags: 0, MpIsaBus, sourceIrq: 0, destination: 0xFF, input: 1));

        var length = 44 + entries.Sum(e => e.Length);
        if (MpConfigTable + (ulong)length > Rsdp) throw new InvalidOperationException($"the MP table ({length} bytes) runs into the RSDP");
        var t = new byte[length];
        Ascii(t, 0, "PCMP");
        U16(t, 4, (ushort)length);
        t[6] = 4; // spec revision 1.4
        Ascii(t, 8, "ACTORVMM");
        Ascii(t, 16, "ActorVmm PC ");
        U16(t, 34, (ushort)entries.Count);
        U32(t, 36, (uint)Platform.LocalApicBase);
        var at = 44;
        foreach (var e in entries)
        {
            e.CopyTo(t, at);
            at += e.Length;
        }
        t[7] = Checksum(t);
        return t;
    }

    /// <summary>I/O (type 3) or local (type 4) interrupt assignment entry (MP Tables 4-7, 4-9); flags 0 = conforms to the bus.</summary>
    private static byte[] InterruptEntry(byte kind, byte type, ushort flags, byte bus, byte sourceIrq, byte destination, byte input)
    {
        var e = new byte[8];
        e[0] = kind;
        e[1] = type;
        U16(e, 2, flags);
        e[4] = bus;
        e[5] = sourceIrq;
        e[6] = destination;
        e[7] = input;
        return e;
    }

    // ---- ACPI ----

    /// <summary>RSDP revision 2 (ACPI §5.2.5.3): 36 bytes, checksum over the first 20, extended checksum over all.</summary>
    public static byte[] RsdpStructure(uint rsdt, ulong xsdt)
    {
        var b = new byte[36];
        Ascii(b, 0, "RSD PTR ");
        Ascii(b, 9, OemId);
        b[15] = 2;
        U32(b, 16, rsdt);
        U32(b, 20, 36);
        U64(b, 24, xsdt);
        b[8] = Checksum(b.AsSpan(0, 20));
        b[32] = Checksum(b);
        return b;
    }

    public static byte[] RsdtTable(uint[] tables)
    {
        var t = Header("RSDT", 36 + 4 * tables.Length, revision: 1);
        for (var i = 0; i < tables.Length; i++) U32(t, 36 + 4 * i, tables[i]);
        t[9] = Checksum(t);
        return t;
    }

    public static byte[] XsdtTable(ulong[] tables)
    {
        var t = Header("XSDT", 36 + 8 * tables.Length, revision: 1);
        for (var i = 0; i < tables.Length; i++) U64(t, 36 + 8 * i, tables[i]);
        t[9] = Checksum(t);
        return t;
    }

    public const byte MadtLocalApic = 0, MadtIoApic = 1, MadtSourceOverride = 2, MadtLocalApicNmi = 4;

    /// <summary>MADT (ACPI §5.2.12): local APIC address, PCAT_COMPAT (an 8259 pair is present), then the entries.</summary>
    public static byte[] MadtTable(int cpus, byte ioApicId)
    {
        var entries = new List<byte[]>();
        for (var i = 0; i < cpus; i++)
        {
            // Processor Local APIC (§5.2.12.2): processor UID, APIC ID, flags: Enabled.
            entries.Add([MadtLocalApic, 8, (byte)i, (byte)i, 1, 0, 0, 0]);
        }
        var ioapic = new byte[12];
        ioapic[0] = MadtIoApic;
        ioapic[1] = 12;
        ioapic[2] = ioApicId;
        U32(ioapic, 4, (uint)Platform.IoApicBase);
        U32(ioapic, 8, 0); // GSI base
        entries.Add(ioapic);

        entries.Add(SourceOverride(Platform.PitIrq, Platform.PitGsi, flags: 0)); // conforms to the bus
        // The SCI is level-triggered; without an override an OS takes it as active low (§5.2.12.5),
        // which the IOAPIC would see asserted while the line is idle. The line here is active high.
        entries.Add(SourceOverride(Platform.AcpiSciIrq, Platform.AcpiSciIrq, flags: MpsActiveHigh | MpsLevel));

        // Local APIC NMI (§5.2.12.7): every processor (UID 0xFF), flags conforming, LINT1.
        entries.Add([MadtLocalApicNmi, 6, 0xFF, 0, 0, 1]);

        var length = 44 + entries.Sum(e => e.Length);
        var t = Header("APIC", length, revision: 3);
        U32(t, 36, (uint)Platform.LocalApicBase);
        U32(t, 40, 1); // PCAT_COMPAT
        var at = 44;
        foreach (var e in entries)
        {
            e.CopyTo(t, at);
            at += e.Length;
        }
        t[9] = Checksum(t);
        return t;
    }

    /// <summary>MPS INTI flags of an interrupt source override (§5.2.12.5): polarity bits 1:0, trigger mode bits 3:2.</summary>
    public const ushort MpsActiveHigh = 0b01, MpsLevel = 0b11 << 2;

    /// <summary>Interrupt Source Override (§5.2.12.5): ISA <paramref name="irq"/> is GSI <paramref name="gsi"/>.</summary>
    private static byte[] SourceOverride(int irq, uint gsi, ushort flags)
    {
        var over = new byte[10];
        over[0] = MadtSourceOverride;
        over[1] = 10;
        over[2] = 0; // bus: ISA
        over[3] = (byte)irq;
        U32(over, 4, gsi);
        U16(over, 8, flags);
        return over;
    }

    // FADT layout (ACPI 6.5 §5.2.9): byte offsets of the fields written here.
    public const int FadtLength = 276;
    public const byte FadtRevision = 6, FadtMinorRevision = 5;
    public const int FadtFirmwareCtrl = 36, FadtDsdt = 40, FadtSciInt = 46, FadtSmiCmd = 48;
    public const int FadtPm1aEvtBlk = 56, FadtPm1aCntBlk = 64, FadtPmTmrBlk = 76, FadtGpe0Blk = 80;
    public const int FadtPm1EvtLen = 88, FadtPm1CntLen = 89, FadtPmTmrLen = 91;
    public const int FadtPLvl2Lat = 96, FadtPLvl3Lat = 98, FadtCentury = 108, FadtIapcBootArch = 109, FadtFlags = 112;
    public const int FadtResetReg = 116, FadtResetValue = 128, FadtMinorVersion = 131;
    public const int FadtXFirmwareCtrl = 132, FadtXDsdt = 140, FadtXPm1aEvtBlk = 148, FadtXPm1aCntBlk = 172, FadtXPmTmrBlk = 208;

    // IAPC_BOOT_ARCH (§5.2.9.3): legacy (ISA) devices, an 8042, no VGA.
    public const ushort BootArchLegacyDevices = 0b0001, BootArch8042 = 0b0010, BootArchVgaNotPresent = 0b0100;

    // FADT fixed feature flags (§5.2.9, "Fixed ACPI Description Table Fixed Feature Flags").
    public const uint FadtWbinvd = 1u << 0, FadtProcC1 = 1u << 2, FadtPowerButton = 1u << 4, FadtSleepButton = 1u << 5,
        FadtFixRtc = 1u << 6, FadtTmrValExt = 1u << 8, FadtResetRegSup = 1u << 10;

    // Generic Address Structure (§5.2.3.2): address space, access size.
    public const byte GasSystemIo = 1, GasByteAccess = 1, GasWordAccess = 2, GasDwordAccess = 3;

    /// <summary>The value written to RESET_REG (0xCF9) to reset: SYS_RST | RST_CPU, a hard reset.</summary>
    public const byte ResetValue = 0x06;

    /// <summary>
    /// The FADT (ACPI 6.5 §5.2.9), revision 6.5, 276 bytes. Both the 32-bit fields (FIRMWARE_CTRL,
    /// DSDT, the *_BLK ports) and their 64-bit forms (X_FIRMWARE_CTRL, X_DSDT, the X_*_BLK Generic
    /// Addresses) are filled with the same addresses: an OS that can use an X_ field ignores the
    /// 32-bit one (§5.2.9), and one that reads only the 32-bit fields (ACPI 1.0 OSes, simple test
    /// kernels) finds everything too. SMI_CMD, ACPI_ENABLE/DISABLE are 0: no SMM, always
    /// in ACPI mode. C2/C3 latencies above their limits: only C1 (HLT). CENTURY is the RTC's
    /// century register. The power and sleep buttons are not fixed hardware (none exist), RTC wake
    /// status is not in PM1 (FIX_RTC), the PM timer is 24 bits.
    /// </summary>
    public static byte[] FadtTable(ulong facs, ulong dsdt)
    {
        var t = Header("FACP", FadtLength, FadtRevision);
        U32(t, FadtFirmwareCtrl, (uint)facs);
        U32(t, FadtDsdt, (uint)dsdt);
        // 44: reserved; 45: Preferred_PM_Profile 0 (unspecified).
        U16(t, FadtSciInt, Platform.AcpiSciIrq);
        U32(t, FadtSmiCmd, 0);
        U32(t, FadtPm1aEvtBlk, Platform.AcpiPm1EventBlock);
        U32(t, FadtPm1aCntBlk, Platform.AcpiPm1ControlBlock);
        U32(t, FadtPmTmrBlk, Platform.AcpiPmTimerBlock);
        t[FadtPm1EvtLen] = (byte)Platform.AcpiPm1EventLength;
        t[FadtPm1CntLen] = (byte)Platform.AcpiPm1ControlLength;
        t[FadtPmTmrLen] = (byte)Platform.AcpiPmTimerLength;
        U16(t, FadtPLvl2Lat, 101);  // > 100 µs: no C2
        U16(t, FadtPLvl3Lat, 1001); // > 1000 µs: no C3
        t[FadtCentury] = CmosRtc.Century;
        U16(t, FadtIapcBootArch, BootArchLegacyDevices | BootArch8042 | BootArchVgaNotPresent);
        U32(t, FadtFlags, FadtWbinvd | FadtProcC1 | FadtPowerButton | FadtSleepButton | FadtFixRtc | FadtResetRegSup);
        Gas(t, FadtResetReg, GasSystemIo, 8, GasByteAccess, Platform.ResetControlPort);
        t[FadtResetValue] = ResetValue;
        t[FadtMinorVersion] = FadtMinorRevision;
        U64(t, FadtXFirmwareCtrl, facs);
        U64(t, FadtXDsdt, dsdt);
        // PM1 status and enable are 16-bit registers (word access); the timer a dword.
        Gas(t, FadtXPm1aEvtBlk, GasSystemIo, Platform.AcpiPm1EventLength * 8, GasWordAccess, Platform.AcpiPm1EventBlock);
        Gas(t, FadtXPm1aCntBlk, GasSystemIo, Platform.AcpiPm1ControlLength * 8, GasWordAccess, Platform.AcpiPm1ControlBlock);
        Gas(t, FadtXPmTmrBlk, GasSystemIo, Platform.AcpiPmTimerLength * 8, GasDwordAccess, Platform.AcpiPmTimerBlock);
        t[9] = Checksum(t);
        return t;
    }

    /// <summary>Generic Address Structure (§5.2.3.2), 12 bytes at <paramref name="at"/>.</summary>
    private static void Gas(byte[] t, int at, byte space, int bitWidth, byte accessSize, ulong address)
    {
        t[at] = space;
        t[at + 1] = (byte)bitWidth;
        t[at + 2] = 0; // bit offset
        t[at + 3] = accessSize;
        U64(t, at + 4, address);
    }

    public const int FacsLength = 64;
    public const byte FacsVersion = 2;

    /// <summary>
    /// The FACS (§5.2.10), 64 bytes, no checksum: hardware signature 0, no firmware waking vector
    /// (no sleep state to wake from), the global lock free, no S4BIOS, no 64-bit wake.
    /// </summary>
    public static byte[] FacsStructure()
    {
        var b = new byte[FacsLength];
        Ascii(b, 0, "FACS");
        U32(b, 4, FacsLength);
        b[32] = FacsVersion;
        return b;
    }

    public const int McfgLength = 44 + 16;
    public const byte McfgRevision = 1;

    /// <summary>
    /// The MCFG (PCI Firmware Specification 3.2 §4.1.2, Table 4-2/4-3): the header, 8 reserved
    /// bytes, then one 16-byte allocation structure per ECAM range: base address (8 bytes), PCI
    /// segment group (2), start and end bus number (1 each), 4 reserved. One range here: segment 0,
    /// buses 0-0 at <see cref="Platform.PciEcamBase"/> (1 MiB, <see cref="Platform.PciEcamLength"/>:
    /// the ECAM of bus 0, PCIe Base §7.2.2). PCI Firmware 3.2 §4.1.2 also wants the range reported
    /// as a motherboard resource: the DSDT's PNP0C02 device (<see cref="MotherboardResourcesAml"/>)
    /// holds it, and Linux uses the MCFG only once it finds the range reserved there or in the e820 map.
    /// </summary>
    public static byte[] McfgTable()
    {
        var t = Header("MCFG", McfgLength, McfgRevision);
        U64(t, 44, Platform.PciEcamBase);
        U16(t, 52, 0);              // PCI segment group
        t[54] = 0;                  // start bus
        t[55] = PciLastBus;         // end bus
        t[9] = Checksum(t);
        return t;
    }

    /// <summary>The root bridge decodes bus 0 only (its _CRS bus range, the MCFG's end bus).</summary>
    public const byte PciLastBus = 0;

    /// <summary>
    /// The GSIs (IOAPIC pins) the PCI INTx wires are on, as the bus model wires them
    /// (<see cref="PciInterruptRouting"/>): INTA#-INTD# of device (slot) d reach GSI
    /// <see cref="PciIntxGsiBase"/> + (d + pin) mod 4 (pin 0 = INTA#), the swizzle of the
    /// PCI-to-PCI Bridge Architecture 1.2 §9.1 table that spreads the INTA# of adjacent slots over
    /// the four wires. They are PCI interrupts: level-triggered, active low (PCI Local Bus 3.0
    /// §2.2.6), and shareable.
    /// </summary>
    public const uint PciIntxGsiBase = PciInterruptRouting.FirstGsi;
    public const int PciIntxLines = PciInterruptRouting.Wires;
    public const int PciSlots = 32;

    /// <summary>The GSI of <paramref name="slot"/>'s INTx pin <paramref name="pin"/> (0 = INTA# .. 3 = INTD#).</summary>
    public static uint PciIntxGsi(int slot, int pin) => PciInterruptRouting.Gsi(slot, (PciInterruptPin)(pin + 1))!.Value;

    public const byte DsdtRevision = 2; // 64-bit AML integers (§5.2.11.1)

    /// <summary>The DSDT (§5.2.11.1): the header and the AML body of <see cref="DsdtAml"/>.</summary>
    public static byte[] DsdtTable()
    {
        byte[] aml = DsdtAml();
        var t = Header("DSDT", 36 + aml.Length, DsdtRevision);
        aml.CopyTo(t, 36);
        t[9] = Checksum(t);
        return t;
    }

    /// <summary>
    /// The DSDT's AML (ACPI §20), as this ASL would compile:
    /// <code>
    /// Name (\_S5, Package (4) { SLP_TYP, SLP_TYP, 0, 0 })  // §7.4.2: PM1a, PM1b SLP_TYP of S5
    /// Scope (\_SB) {
    ///   Device (PCI0) {                                     // §6.1.5 _HID, §6.1.2 _CID
    ///     Name (_HID, EisaId ("PNP0A08"))                   // PCI Express root bridge (PCI Firmware 3.2 §4.1.5)
    ///     Name (_CID, EisaId ("PNP0A03"))                   // compatible: PCI root bridge
    ///     Name (_SEG, 0)  Name (_BBN, 0)  Name (_UID, 0)    // §6.5.6 _SEG, §6.5.5 _BBN, §6.1.12 _UID
    ///     Name (_CRS, ResourceTemplate () {                 // §6.2.2; PCI Firmware 3.2 §4.1.3
    ///       WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)
    ///       IO (Decode16, 0x0CF8, 0x0CF8, 1, 8)            // configuration mechanism #1, consumed
    ///       WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0x0000, 0x0CF7, 0, 0x0CF8)
    ///       WordIO (..., 0, 0xC000, 0xFFFF, 0, 0x4000)       // PciIoWindow
    ///       DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    ///                    0, 0xD0000000, 0xDFFFFFFF, 0, 0x10000000)  // PciMmioWindow
    ///     })
    ///     Name (_PRT, Package (128) {                       // §6.2.13, one entry per slot and pin
    ///       Package (4) { 0xSSSSFFFF, pin, Zero, 16 + (slot + pin) % 4 }, ...
    ///     })
    ///   }
    ///   Device (MRES) {                                     // motherboard resources: the ECAM
    ///     Name (_HID, EisaId ("PNP0C02"))  Name (_UID, 0)
    ///     Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xC0000000, 0x00100000) })
    ///   }
    ///   Device (COM1) { Name (_HID, EisaId ("PNP0501"))  Name (_UID, 1)
    ///     Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 1, 8)  IRQNoFlags () { 4 } }) }
    ///   Device (RTC) { Name (_HID, EisaId ("PNP0B00"))
    ///     Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0070, 0x0070, 1, 2)  IRQNoFlags () { 8 } }) }
    ///   Device (KBD) { Name (_HID, EisaId ("PNP0303"))
    ///     Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0060, 0x0060, 1, 1)
    ///                                       IO (Decode16, 0x0064, 0x0064, 1, 1)  IRQNoFlags () { 1 } }) }
    /// }
    /// </code>
    /// The _PRT entries name no link device (Source = Zero): each pin is hard-wired to the GSI in
    /// Source Index (§6.2.13, "the second model"), which an OS takes as a PCI interrupt:
    /// level-triggered, active low, shareable. So the MADT needs no override for GSIs 16-19
    /// (interrupt source overrides describe ISA IRQs only, §5.2.12.5). No _OSC: it only hands
    /// PCI Express native features (hotplug, AER, PME, ASPM; PCI Firmware 3.2 §4.5) to the OS,
    /// and there is no PCI Express port here; MSI/MSI-X and ECAM do not depend on it.
    /// </summary>
    public static byte[] DsdtAml() =>
    [
        .. S5Aml(AcpiPm.SleepTypeS5),
        .. Aml.Scope("\\_SB", PciRootBridgeAml(), MotherboardResourcesAml(), Com1Aml(), RtcAml(), KeyboardAml()),
    ];

    /// <summary>The root bridge <c>Device (PCI0)</c> of <see cref="DsdtAml"/>.</summary>
    public static byte[] PciRootBridgeAml() => Aml.Device("PCI0",
        Aml.Name("_HID", Aml.EisaId("PNP0A08")),
        Aml.Name("_CID", Aml.EisaId("PNP0A03")),
        Aml.Name("_SEG", Aml.Integer(0)),
        Aml.Name("_BBN", Aml.Integer(0)),
        Aml.Name("_UID", Aml.Integer(0)),
        Aml.Name("_CRS", Aml.ResourceTemplate(
            Aml.WordAddress(Aml.BusNumberRange, 0, PciLastBus),
            Aml.Io(Platform.PciConfigAddressPort, Platform.PciConfigAddressPort, 1, PciConfigLength),
            Aml.WordAddress(Aml.IoRange, 0, (ushort)(Platform.PciConfigAddressPort - 1)),
            Aml.WordAddress(Aml.IoRange, Platform.PciIoWindowBase, (ushort)(Platform.PciIoWindowBase + Platform.PciIoWindowLength - 1)),
            Aml.DWordMemory((uint)Platform.PciMmioWindowBase, (uint)(Platform.PciMmioWindowBase + Platform.PciMmioWindowLength - 1)))),
        Aml.Name("_PRT", PciRoutingTableAml()));

    /// <summary>Configuration mechanism #1's ports, CONFIG_ADDRESS and CONFIG_DATA: 0xCF8-0xCFF.</summary>
    public const byte PciConfigLength = 8;

    /// <summary><c>Package (128) { Package (4) { Address, Pin, Source, Source Index }, ... }</c>
    /// (§6.2.13, Table "Mapping Fields"): Address is the slot as in _ADR with the function all
    /// ones (0xSSSSFFFF, any function), Pin 0-3 = INTA#-INTD#, Source Zero, Source Index the GSI.</summary>
    public static byte[] PciRoutingTableAml()
    {
        var entries = new List<byte[]>();
        for (var slot = 0; slot < PciSlots; slot++)
            for (var pin = 0; pin < PciIntxLines; pin++)
                entries.Add(Aml.Package(
                    Aml.Integer((uint)slot << 16 | 0xFFFF),
                    Aml.Integer((ulong)pin),
                    Aml.Integer(0),
                    Aml.Integer(PciIntxGsi(slot, pin))));
        return Aml.Package([.. entries]);
    }

    /// <summary><c>Device (MRES)</c>: a PNP0C02 device ("motherboard resources", reserved by the OS
    /// and given to no driver) holding the ECAM range, so an OS that checks the MCFG range against
    /// the motherboard resources (Linux: "MMCONFIG ... reserved as ACPI motherboard resource")
    /// uses it.</summary>
    public static byte[] MotherboardResourcesAml() => Aml.Device("MRES",
        Aml.Name("_HID", Aml.EisaId("PNP0C02")),
        Aml.Name("_UID", Aml.Integer(0)),
        Aml.Name("_CRS", Aml.ResourceTemplate(Aml.Memory32Fixed((uint)Platform.PciEcamBase, (uint)Platform.PciEcamLength))));

    /// <summary><c>Device (COM1)</c>: a 16550A-compatible UART (PNP0501) at 0x3F8-0x3FF on ISA IRQ 4.</summary>
    public static byte[] Com1Aml() => Aml.Device("COM1",
        Aml.Name("_HID", Aml.EisaId("PNP0501")),
        Aml.Name("_UID", Aml.Integer(1)),
        Aml.Name("_CRS", Aml.ResourceTemplate(
            Aml.Io(Platform.Com1Port, Platform.Com1Port, 1, (byte)Platform.Com1Length),
            Aml.IrqNoFlags((int)Platform.Com1Gsi))));

    /// <summary><c>Device (RTC)</c>: the AT real-time clock / CMOS (PNP0B00) at 0x70-0x71 on ISA IRQ 8.</summary>
    public static byte[] RtcAml() => Aml.Device("RTC",
        Aml.Name("_HID", Aml.EisaId("PNP0B00")),
        Aml.Name("_CRS", Aml.ResourceTemplate(
            Aml.Io(Platform.RtcPort, Platform.RtcPort, 1, (byte)Platform.RtcLength),
            Aml.IrqNoFlags(Platform.RtcIrq))));

    /// <summary><c>Device (KBD)</c>: the 8042 keyboard controller (PNP0303), data 0x60 and
    /// command/status 0x64, keyboard on ISA IRQ 1. No PS/2 mouse (the 8042 has no aux port here).</summary>
    public static byte[] KeyboardAml() => Aml.Device("KBD",
        Aml.Name("_HID", Aml.EisaId("PNP0303")),
        Aml.Name("_CRS", Aml.ResourceTemplate(
            Aml.Io(Platform.I8042DataPort, Platform.I8042DataPort, 1, 1),
            Aml.Io(Platform.I8042CommandPort, Platform.I8042CommandPort, 1, 1),
            Aml.IrqNoFlags((int)Platform.KeyboardGsi))));

    /// <summary><c>Name (\_S5, Package (4) { s5, s5, Zero, Zero })</c> in AML: NameOp, the rooted
    /// NameString "\_S5_", PackageOp with a one-byte PkgLength (it counts itself) and NumElements,
    /// then the elements (the type as the shortest integer, ByteConst for 7; ZeroOp for the reserved ones).</summary>
    public static byte[] S5Aml(byte s5) =>
        Aml.Name("\\_S5", Aml.Package(Aml.Integer(s5), Aml.Integer(s5), Aml.Integer(0), Aml.Integer(0)));

    /// <summary>The 36-byte system description table header (ACPI §5.2.6); checksum at 9 left 0.</summary>
    private static byte[] Header(string signature, int length, byte revision)
    {
        var t = new byte[length];
        Ascii(t, 0, signature);
        U32(t, 4, (uint)length);
        t[8] = revision;
        Ascii(t, 10, OemId);
        Ascii(t, 16, "ACTORVMM");
        U32(t, 24, 1);
        Ascii(t, 28, "AVMM");
        U32(t, 32, 1);
        return t;
    }

    /// <summary>The byte that makes <paramref name="bytes"/> sum to 0 mod 256 (with the checksum field still 0).</summary>
    public static byte Checksum(ReadOnlySpan<byte> bytes)
    {
        byte sum = 0;
        foreach (var b in bytes) sum += b;
        return (byte)(0 - sum);
    }

    private static void Ascii(byte[] b, int at, string s) => Encoding.ASCII.GetBytes(s).CopyTo(b, at);
    private static void U16(byte[] b, int at, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(at), v);
    private static void U32(byte[] b, int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), v);
    private static void U64(byte[] b, int at, ulong v) => BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(at), v);
}
