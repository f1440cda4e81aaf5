using System.Buffers.Binary;
using System.Text;
using ActorVmm.Devices;
using ActorVmm.LibVmm;

namespace ActorVmm.Host.Boot;

/// <summary>
/// The tables a PC firmware leaves for an OS to find its processors and interrupt routing, for
/// boot images that are not firmware: the Intel MultiProcessor Specification 1.4 table ("MP"
/// below) and the ACPI RSDP/RSDT/XSDT with a MADT (ACPI 6.x §5.2.5-5.2.12). Pure functions over
/// <see cref="IGuestMemory"/>; everything sits in the BIOS area at <see cref="Base"/>:
/// <list type="bullet">
/// <item>0xF0000: MP floating pointer "_MP_" (MP §4.1), then the MP configuration table "PCMP"
/// (MP §4.2): one processor entry per vcpu (APIC ID = vcpu id, BSP flag on vcpu 0), one bus
/// entry "ISA", one IOAPIC entry, I/O interrupt entries for ISA IRQs 0-15 except the cascade
/// IRQ 2 (IRQ 0 → INTIN 2, others identity; conforming polarity and trigger), and the local
/// interrupt entries ExtINT → LINT0, NMI → LINT1 of every local APIC (virtual wire).</item>
/// <item>0xF0800: RSDP "RSD PTR " revision 2 (16-byte aligned, inside 0xE0000-0xFFFFF), then
/// RSDT, XSDT and the MADT "APIC": one Processor Local APIC entry per vcpu, one I/O APIC entry
/// (GSI base 0), an interrupt source override ISA IRQ 0 → GSI 2, and a local APIC NMI on LINT1.</item>
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
    public const ulong End = Base + 0x1000;

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
        memory.Write(new GuestPhysAddr(Rsdt), RsdtTable([(uint)Madt]));
        memory.Write(new GuestPhysAddr(Xsdt), XsdtTable([Madt]));
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
        var bus = new byte[8];
        bus[0] = MpBus;
        bus[1] = 0;
        Ascii(bus, 2, "ISA   ");
        entries.Add(bus);

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
            entries.Add(InterruptEntry(MpIoInterrupt, type: 0, sourceIrq: (byte)irq, destination: ioApicId,
                input: (byte)(irq == Platform.PitIrq ? Platform.PitGsi : (uint)irq)));
        }
        // Local interrupts of every local APIC (destination 0xFF): ExtINT on LINT0, NMI on LINT1.
        entries.Add(InterruptEntry(MpLocalInterrupt, type: 3, sourceIrq: 0, destination: 0xFF, input: 0));
        entries.Add(InterruptEntry(MpLocalInterrupt, type: 1, sourceIrq: 0, destination: 0xFF, input: 1));

        var length = 44 + entries.Sum(e => e.Length);
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
    private static byte[] InterruptEntry(byte kind, byte type, byte sourceIrq, byte destination, byte input)
    {
        var e = new byte[8];
        e[0] = kind;
        e[1] = type;
        U16(e, 2, 0);
        e[4] = 0; // source bus: ISA
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

        var over = new byte[10];
        over[0] = MadtSourceOverride;
        over[1] = 10;
        over[2] = 0; // bus: ISA
        over[3] = Platform.PitIrq;
        U32(over, 4, Platform.PitGsi);
        U16(over, 8, 0); // conforms to the bus
        entries.Add(over);

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
