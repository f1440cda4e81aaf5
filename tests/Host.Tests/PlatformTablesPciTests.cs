using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using ActorVmm.Devices;
using ActorVmm.Devices.Pci;
using ActorVmm.Host.Boot;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// The PCI parts of the ACPI tables as written into guest memory: the MCFG (PCI Firmware 3.2
/// §4.1.2), and the DSDT's root bridge \_SB.PCI0 (its _HID/_CID/_SEG/_BBN/_UID, the _CRS windows,
/// the _PRT), the ECAM motherboard resource and the legacy ISA devices, byte by byte; the AML
/// encoder against the ACPI 6.5 §20.2 grammar; and, where ACPICA's iasl is installed, the DSDT
/// and MCFG as iasl disassembles them.
/// </summary>
public sealed class PlatformTablesPciTests : IDisposable
{
    private readonly GuestMemoryMap _memory = VmspaceLayout.Build(4 << 20);

    public PlatformTablesPciTests() => PlatformTables.Write(_memory, cpus: 2, ioApicId: 2);

    public void Dispose() => _memory.Dispose();

    private byte[] Read(ulong address, int length)
    {
        var b = new byte[length];
        _memory.Read(new GuestPhysAddr(address), b);
        return b;
    }

    private static int Sum(byte[] b) => b.Aggregate(0, (s, x) => (s + x) & 0xFF);
    private static string Ascii(byte[] b, int at, int n) => Encoding.ASCII.GetString(b, at, n);
    private static ushort U16(byte[] b, int at) => BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(at));
    private static uint U32(byte[] b, int at) => BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(at));
    private static ulong U64(byte[] b, int at) => BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(at));

    private byte[] Table(ulong address)
    {
        var t = Read(address, (int)U32(Read(address, 8), 4));
        Assert.Equal(0, Sum(t));
        return t;
    }

    /// <summary>A table found as an OS finds it: the RSDP in the BIOS area, then the XSDT (and the
    /// RSDT, which must list the same address) entry with the signature.</summary>
    private byte[] Find(string signature)
    {
        ulong rsdpAt = 0xE0000;
        while (Ascii(Read(rsdpAt, 8), 0, 8) != "RSD PTR ") rsdpAt += 16;
        var rsdp = Read(rsdpAt, 36);
        var xsdt = Table(U64(rsdp, 24));
        var rsdt = Table(U32(rsdp, 16));
        var fromX = Enumerable.Range(0, (xsdt.Length - 36) / 8).Select(i => U64(xsdt, 36 + 8 * i)).ToList();
        var fromR = Enumerable.Range(0, (rsdt.Length - 36) / 4).Select(i => (ulong)U32(rsdt, 36 + 4 * i)).ToList();
        Assert.Equal(fromX, fromR);
        var at = Assert.Single(fromX, a => Ascii(Read(a, 4), 0, 4) == signature);
        return Table(at);
    }

    private byte[] Dsdt() => Table(U32(Find("FACP"), 40));

    [Fact]
    public void Mcfg_must_be_listed_in_rsdt_and_xsdt_and_give_the_ecam_of_segment_0_bus_0()
    {
        var mcfg = Find("MCFG");
        // PCI Firmware 3.2 §4.1.2 Table 4-2: header (revision 1), 8 reserved bytes, then one
        // allocation structure (Table 4-3): base address, segment group, start bus, end bus, 4 reserved.
        Assert.Equal(60, mcfg.Length);
        Assert.Equal(60u, U32(mcfg, 4));
        Assert.Equal(1, mcfg[8]);
        Assert.Equal("ACTVMM", Ascii(mcfg, 10, 6));
        Assert.Equal(0UL, U64(mcfg, 36));
        Assert.Equal(0xC000_0000UL, U64(mcfg, 44));
        Assert.Equal(Platform.PciEcamBase, U64(mcfg, 44));
        Assert.Equal(0, U16(mcfg, 52)); // segment 0
        Assert.Equal(0, mcfg[54]);      // start bus
        Assert.Equal(0, mcfg[55]);      // end bus: bus 0 only
        Assert.Equal(0u, U32(mcfg, 56));
        // One bus of 32 devices x 8 functions x 4 KiB (PCIe Base §7.2.2) is the ECAM window.
        Assert.Equal((ulong)(mcfg[55] - mcfg[54] + 1) << 20, Platform.PciEcamLength);
    }

    // ---- An AML reader written from the grammar (ACPI 6.5 §20.2), independent of the encoder ----

    /// <summary>PkgLength (§20.2.4): returns the encoded value (which counts its own bytes) and moves past it.</summary>
    private static int PkgLength(byte[] b, ref int p)
    {
        var lead = b[p];
        var follow = lead >> 6;
        if (follow == 0) { p++; return lead & 0x3F; }
        var value = lead & 0x0F;
        for (var i = 1; i <= follow; i++) value |= b[p + i] << (4 + 8 * (i - 1));
        p += 1 + follow;
        return value;
    }

    /// <summary>A ComputationalData integer (§20.2.3).</summary>
    private static ulong Integer(byte[] b, ref int p)
    {
        var op = b[p++];
        ulong v;
        switch (op)
        {
            case 0x00: return 0;
            case 0x01: return 1;
            case 0x0A: v = b[p]; p += 1; return v;
            case 0x0B: v = U16(b, p); p += 2; return v;
            case 0x0C: v = U32(b, p); p += 4; return v;
            case 0x0E: v = U64(b, p); p += 8; return v;
            default: throw new Xunit.Sdk.XunitException($"not an integer: opcode 0x{op:X2} at {p - 1}");
        }
    }

    /// <summary>The objects of a term list, by name: Name (NameOp 0x08 NameSeg data) and Device
    /// (0x5B 0x82 PkgLength NameSeg terms) with single-segment names, the forms PCI0 uses. Returns the
    /// byte range of each object's data (Name) or term list (Device).</summary>
    private static Dictionary<string, (int Start, int End)> Objects(byte[] b, int start, int end)
    {
        var objects = new Dictionary<string, (int, int)>();
        var p = start;
        while (p < end)
        {
            if (b[p] == 0x08)
            {
                var name = Ascii(b, p + 1, 4);
                p += 5;
                var dataStart = p;
                p = SkipData(b, p);
                objects.Add(name, (dataStart, p));
            }
            else if (b[p] == 0x5B && b[p + 1] == 0x82)
            {
                p += 2;
                var pkgStart = p;
                var length = PkgLength(b, ref p);
                var name = Ascii(b, p, 4);
                objects.Add(name, (p + 4, pkgStart + length));
                p = pkgStart + length;
            }
            else throw new Xunit.Sdk.XunitException($"unexpected AML opcode 0x{b[p]:X2} at {p}");
        }
        Assert.Equal(end, p);
        return objects;
    }

    private static int SkipData(byte[] b, int p)
    {
        if (b[p] is 0x11 or 0x12) // Buffer, Package: the PkgLength covers the rest
        {
            var at = p + 1;
            var length = PkgLength(b, ref at);
            return p + 1 + length;
        }
        if (b[p] == 0x0D) return Array.IndexOf(b, (byte)0, p + 1) + 1; // String
        Integer(b, ref p);
        return p;
    }

    /// <summary>The PCI0 device's terms: the DSDT body is Name(\_S5) then Scope (\_SB) { Device (PCI0) ... }.</summary>
    private (byte[] Dsdt, Dictionary<string, (int Start, int End)> SbObjects) SystemBus()
    {
        var dsdt = Dsdt();
        var p = 36;
        Assert.Equal(new byte[] { 0x08, (byte)'\\', (byte)'_', (byte)'S', (byte)'5', (byte)'_' }, dsdt[p..(p + 6)]);
        p = SkipData(dsdt, p + 6);
        Assert.Equal(0x10, dsdt[p]); // ScopeOp (§20.2.5.1)
        var pkgStart = ++p;
        var length = PkgLength(dsdt, ref p);
        Assert.Equal(dsdt.Length, pkgStart + length); // the scope is the rest of the table
        Assert.Equal(new byte[] { (byte)'\\', (byte)'_', (byte)'S', (byte)'B', (byte)'_' }, dsdt[p..(p + 5)]);
        return (dsdt, Objects(dsdt, p + 5, pkgStart + length));
    }

    [Fact]
    public void Dsdt_pci0_must_be_a_pci_express_root_bridge_of_segment_0_bus_0()
    {
        var (dsdt, sb) = SystemBus();
        var (start, end) = sb["PCI0"];
        var pci0 = Objects(dsdt, start, end);
        Assert.Equal(["_HID", "_CID", "_SEG", "_BBN", "_UID", "_CRS", "_PRT"], pci0.Keys);
        byte[] Data(string n) => dsdt[pci0[n].Start..pci0[n].End];

        // EISAID ("PNP0A08") = DWordConst 0x080AD041: 'P','N','P' as 5-bit letters 0x10 0x0E 0x10
        // packed big-endian into 0x41D0, then the product 0x0A08 (ACPI §19.6 EISAID, §6.1.5 _HID).
        Assert.Equal(new byte[] { 0x0C, 0x41, 0xD0, 0x0A, 0x08 }, Data("_HID"));
        Assert.Equal(new byte[] { 0x0C, 0x41, 0xD0, 0x0A, 0x03 }, Data("_CID")); // PNP0A03
        Assert.Equal(new byte[] { 0x00 }, Data("_SEG")); // ZeroOp: segment group 0 (§6.5.6), the MCFG's
        Assert.Equal(new byte[] { 0x00 }, Data("_BBN")); // base bus 0 (§6.5.5)
        Assert.Equal(new byte[] { 0x00 }, Data("_UID"));
    }

    [Fact]
    public void Dsdt_pci0_crs_must_give_bus_0_the_config_ports_and_the_io_and_memory_windows()
    {
        var (dsdt, sb) = SystemBus();
        var pci0 = Objects(dsdt, sb["PCI0"].Start, sb["PCI0"].End);
        var crs = dsdt[pci0["_CRS"].Start..pci0["_CRS"].End];
        byte[] expected =
        [
            // Word Address Space Descriptor (ACPI 6.5 §6.4.3.5.3), bus number range (type 2):
            // producer, MinFixed, MaxFixed, PosDecode (general flags 0x0C); granularity 0, 0-0, translation 0, length 1.
            0x88, 0x0D, 0x00, 0x02, 0x0C, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
            // I/O Port Descriptor (§6.4.2.5): Decode16, 0xCF8-0xCF8, alignment 1, length 8: CONFIG_ADDRESS
            // and CONFIG_DATA of configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2), consumed.
            0x47, 0x01, 0xF8, 0x0C, 0xF8, 0x0C, 0x01, 0x08,
            // WordIO (type 1, _RNG = EntireRange 3): 0x0000-0x0CF7, length 0x0CF8: the legacy ports below the config ports.
            0x88, 0x0D, 0x00, 0x01, 0x0C, 0x03, 0x00, 0x00, 0x00, 0x00, 0xF7, 0x0C, 0x00, 0x00, 0xF8, 0x0C,
            // WordIO: 0xC000-0xFFFF, length 0x4000: the I/O BAR window.
            0x88, 0x0D, 0x00, 0x01, 0x0C, 0x03, 0x00, 0x00, 0x00, 0xC0, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x40,
            // DWord Address Space Descriptor (§6.4.3.5.2), memory (type 0), type-specific 0x01 (ReadWrite,
            // NonCacheable): 0xD0000000-0xDFFFFFFF, length 0x10000000: the 32-bit memory BAR window.
            0x87, 0x17, 0x00, 0x00, 0x0C, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xD0,
            0xFF, 0xFF, 0xFF, 0xDF, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
            // End Tag (§6.4.2.9), checksum 0.
            0x79, 0x00,
        ];
        // Buffer (§20.2.5.4): BufferOp, PkgLength (2 bytes: 0x4 | count 1 << 6, then bits 11:4), BufferSize ByteConst.
        var body = 2 + expected.Length; // BufferSize (0x0A n) and the bytes
        Assert.Equal([0x11, (byte)(0x40 | ((body + 2) & 0xF)), (byte)((body + 2) >> 4), 0x0A, (byte)expected.Length, .. expected], crs);

        // The windows are the platform's, and the I/O ranges leave out exactly 0xCF8-0xCFF.
        Assert.Equal(Platform.PciIoWindowBase, U16(expected, 16 + 8 + 16 + 8));
        Assert.Equal(Platform.PciIoWindowBase + Platform.PciIoWindowLength - 1, U16(expected, 16 + 8 + 16 + 10));
        Assert.Equal(Platform.PciMmioWindowBase, U32(expected, 56 + 10));
        Assert.Equal(Platform.PciMmioWindowLength, U32(expected, 56 + 22));
        Assert.Equal(Platform.PciConfigAddressPort, U16(expected, 18));
    }

    [Fact]
    public void Dsdt_pci0_prt_must_route_the_four_pins_of_every_slot_to_gsis_16_to_19_with_the_swizzle()
    {
        var (dsdt, sb) = SystemBus();
        var pci0 = Objects(dsdt, sb["PCI0"].Start, sb["PCI0"].End);
        var p = pci0["_PRT"].Start;
        Assert.Equal(0x12, dsdt[p++]); // PackageOp
        var pkgStart = p;
        var length = PkgLength(dsdt, ref p);
        Assert.Equal(pci0["_PRT"].End, pkgStart + length);
        Assert.Equal(128, dsdt[p++]); // NumElements: 32 slots x 4 pins

        var routes = new Dictionary<(int Slot, int Pin), ulong>();
        for (var i = 0; i < 128; i++)
        {
            // Package (4) { Address, Pin, Source, Source Index } (ACPI 6.5 §6.2.13, Table "Mapping Fields").
            Assert.Equal(0x12, dsdt[p++]);
            var entryStart = p;
            var entryLength = PkgLength(dsdt, ref p);
            Assert.Equal(4, dsdt[p++]);
            var address = Integer(dsdt, ref p);
            var pin = Integer(dsdt, ref p);
            Assert.Equal(0x00, dsdt[p]); // Source: Zero (ZeroOp), a hard-wired GSI, no link device
            var source = Integer(dsdt, ref p);
            var gsi = Integer(dsdt, ref p);
            Assert.Equal(entryStart + entryLength, p);
            Assert.Equal(0xFFFFUL, address & 0xFFFF); // any function of the device
            Assert.Equal(0UL, source);
            Assert.InRange(pin, 0UL, 3UL);
            routes.Add(((int)(address >> 16), (int)pin), gsi);
        }
        Assert.Equal(pkgStart + length, p);

        for (var slot = 0; slot < 32; slot++)
            for (var pin = 0; pin < 4; pin++)
                Assert.Equal(16UL + (ulong)((slot + pin) % 4), routes[(slot, pin)]);
        // Spelled out for the first slots: INTA# of slots 0, 1, 2, 3, 4 on GSI 16, 17, 18, 19, 16.
        Assert.Equal([16UL, 17, 18, 19, 16], Enumerable.Range(0, 5).Select(s => routes[(s, 0)]));
        Assert.Equal(19UL, routes[(1, 2)]); // slot 1 INTC#
        // The table states what the bus model wires: every device's pins reach the GSIs its routing gives.
        for (var slot = 0; slot < 32; slot++)
            for (var pin = 0; pin < 4; pin++)
                Assert.Equal(PciInterruptRouting.Gsi(slot, (PciInterruptPin)(pin + 1)), (uint)routes[(slot, pin)]);
        Assert.All(routes.Values, g => Assert.InRange(g, PlatformTables.PciIntxGsiBase, PlatformTables.PciIntxGsiBase + 3));
        Assert.True(PlatformTables.PciIntxGsiBase + 3 < Platform.IoApicPins);
    }

    [Fact]
    public void Madt_must_keep_its_isa_overrides_and_need_none_for_the_pci_gsis()
    {
        var madt = Find("APIC");
        var overrides = new List<byte[]>();
        for (var p = 44; p < madt.Length; p += madt[p + 1])
            if (madt[p] == PlatformTables.MadtSourceOverride) overrides.Add(madt[p..(p + madt[p + 1])]);
        // Interrupt source overrides map ISA IRQs (bus 0) only (ACPI 6.5 §5.2.12.5); the PCI GSIs'
        // level/active-low mode comes with their hard-wired _PRT entries.
        Assert.All(overrides, o => Assert.Equal(0, o[2]));
        Assert.Equal([(0, 2u), (9, 9u)], overrides.Select(o => ((int)o[3], U32(o, 4))));
        Assert.DoesNotContain(overrides, o => U32(o, 4) >= PlatformTables.PciIntxGsiBase);
    }

    [Fact]
    public void Dsdt_must_reserve_the_ecam_as_a_motherboard_resource()
    {
        var (dsdt, sb) = SystemBus();
        var mres = Objects(dsdt, sb["MRES"].Start, sb["MRES"].End);
        byte[] Data(string n) => dsdt[mres[n].Start..mres[n].End];
        Assert.Equal(new byte[] { 0x0C, 0x41, 0xD0, 0x0C, 0x02 }, Data("_HID")); // PNP0C02
        // 32-bit Fixed Memory Range Descriptor (§6.4.3.4): ReadWrite, base 0xC0000000, length 1 MiB; End Tag.
        byte[] descriptors = [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xC0, 0x00, 0x00, 0x10, 0x00, 0x79, 0x00];
        Assert.Equal([0x11, (byte)(2 + 1 + descriptors.Length), 0x0A, (byte)descriptors.Length, .. descriptors], Data("_CRS"));
        Assert.Equal(Platform.PciEcamBase, U32(descriptors, 4));
        Assert.Equal(Platform.PciEcamLength, U32(descriptors, 8));
    }

    [Fact]
    public void Dsdt_must_describe_com1_the_rtc_and_the_keyboard_with_their_ports_and_isa_irqs()
    {
        var (dsdt, sb) = SystemBus();
        Assert.Equal(["PCI0", "MRES", "COM1", "RTC_", "KBD_"], sb.Keys);
        byte[] Data(string device, string name)
        {
            var o = Objects(dsdt, sb[device].Start, sb[device].End);
            return dsdt[o[name].Start..o[name].End];
        }
        static byte[] Template(params byte[] descriptors) =>
            [0x11, (byte)(2 + 1 + descriptors.Length + 2), 0x0A, (byte)(descriptors.Length + 2), .. descriptors, 0x79, 0x00];

        Assert.Equal(new byte[] { 0x0C, 0x41, 0xD0, 0x05, 0x01 }, Data("COM1", "_HID")); // PNP0501
        // IO (Decode16, 0x3F8, 0x3F8, 1, 8) (§6.4.2.5); IRQNoFlags () {4}: the IRQ Descriptor's mask (§6.4.2.1).
        Assert.Equal(Template(0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00), Data("COM1", "_CRS"));
        Assert.Equal(new byte[] { 0x0C, 0x41, 0xD0, 0x0B, 0x00 }, Data("RTC_", "_HID")); // PNP0B00
        Assert.Equal(Template(0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x22, 0x00, 0x01), Data("RTC_", "_CRS"));
        Assert.Equal(new byte[] { 0x0C, 0x41, 0xD0, 0x03, 0x03 }, Data("KBD_", "_HID")); // PNP0303
        Assert.Equal(Template(0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01, 0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01, 0x22, 0x02, 0x00),
            Data("KBD_", "_CRS"));
    }

    [Fact]
    public void Dsdt_must_still_begin_with_the_s5_package()
    {
        var dsdt = Dsdt();
        byte[] s5 = [0x08, (byte)'\\', (byte)'_', (byte)'S', (byte)'5', (byte)'_', 0x12, 0x08, 0x04, 0x0A, 0x07, 0x0A, 0x07, 0x00, 0x00];
        Assert.Equal(s5, dsdt[36..(36 + s5.Length)]);
    }

    // ---- The encoder against the grammar ----

    [Theory]
    [InlineData(0, new byte[] { 0x01 })]
    [InlineData(62, new byte[] { 0x3F })]              // 63 with itself: the largest one-byte form
    [InlineData(63, new byte[] { 0x41, 0x04 })]        // 65 = 0x41: count 1, nibble 1, then 0x04
    [InlineData(0xFFD, new byte[] { 0x4F, 0xFF })]     // 0xFFF: the largest two-byte form
    [InlineData(0xFFE, new byte[] { 0x81, 0x00, 0x01 })] // 0x1001: count 2, nibble 1, bits 11:4 0x00, bits 19:12 0x01
    public void Pkg_length_must_count_itself_and_take_as_few_bytes_as_the_grammar_allows(int content, byte[] expected)
    {
        Assert.Equal(expected, Aml.PkgLength(content));
    }

    [Fact]
    public void Aml_integers_names_and_eisa_ids_must_encode_as_the_grammar_says()
    {
        Assert.Equal(new byte[] { 0x00 }, Aml.Integer(0));
        Assert.Equal(new byte[] { 0x01 }, Aml.Integer(1));
        Assert.Equal(new byte[] { 0x0A, 0x10 }, Aml.Integer(16));
        Assert.Equal(new byte[] { 0x0B, 0xFF, 0xFF }, Aml.Integer(0xFFFF));
        Assert.Equal(new byte[] { 0x0C, 0xFF, 0xFF, 0x1F, 0x00 }, Aml.Integer(0x1FFFFF));
        Assert.Equal(new byte[] { 0x0E, 0, 0, 0, 0, 1, 0, 0, 0 }, Aml.Integer(1UL << 32));
        Assert.Equal(0x080AD041u, Aml.EisaIdValue("PNP0A08"));
        Assert.Equal(0x0303D041u, Aml.EisaIdValue("PNP0303"));
        Assert.Equal("\\_SB_"u8.ToArray(), Aml.NameString("\\_SB"));
        Assert.Equal([0x5C, 0x2E, .. "_SB_PCI0"u8.ToArray()], Aml.NameString("\\_SB.PCI0"));
        Assert.Equal([0x2F, 3, .. "_SB_PCI0S08_"u8.ToArray()], Aml.NameString("_SB.PCI0.S08"));
        Assert.Throws<ArgumentException>(() => Aml.NameSeg("0ABC"));
        Assert.Throws<ArgumentException>(() => Aml.EisaIdValue("PNP0A0"));
    }

    // ---- ACPICA's disassembler, where installed ----

    private static string Iasl(string directory, params string[] arguments)
    {
        var psi = new ProcessStartInfo("iasl", arguments) { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = directory };
        using var iasl = Process.Start(psi)!;
        var output = iasl.StandardOutput.ReadToEnd() + iasl.StandardError.ReadToEnd();
        iasl.WaitForExit();
        Assert.True(iasl.ExitCode == 0, output);
        return output;
    }

    /// <summary>iasl -d: the table's disassembly (ASL for a DSDT, a field dump for a data table).
    /// With <paramref name="recompiled"/>, the ASL compiled again with optimizations off (-oa).</summary>
    private static string Disassemble(byte[] table, string name, out byte[]? recompiled, bool recompile = false)
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-iasl-");
        try
        {
            File.WriteAllBytes(Path.Combine(dir.FullName, name + ".aml"), table);
            Iasl(dir.FullName, "-d", name + ".aml");
            var dsl = File.ReadAllText(Path.Combine(dir.FullName, name + ".dsl"));
            recompiled = null;
            if (recompile)
            {
                var output = Iasl(dir.FullName, "-oa", "-p", "again", name + ".dsl");
                Assert.Contains("0 Errors, 0 Warnings", output);
                recompiled = File.ReadAllBytes(Path.Combine(dir.FullName, "again.aml"));
            }
            return dsl;
        }
        finally { dir.Delete(recursive: true); }
    }

    /// <summary>Normalizes a disassembly for matching: iasl's comments dropped, one term a line, no indentation.</summary>
    private static string Code(string dsl) => string.Join("\n", System.Text.RegularExpressions.Regex.Replace(dsl, @"\s*/\*.*?\*/", "", System.Text.RegularExpressions.RegexOptions.Singleline)
        .Split('\n')
        .Select(l => (l.IndexOf("//", StringComparison.Ordinal) is var c and >= 0 ? l[..c] : l).Trim())
        .Where(l => l.Length > 0));

    [AcpicaFact("iasl")]
    public void Iasl_must_disassemble_the_dsdt_into_the_root_bridge_it_describes()
    {
        var dsdt = Dsdt();
        var dsl = Code(Disassemble(dsdt, "dsdt", out var recompiled, recompile: true));
        Assert.Contains("Name (\\_S5, Package (0x04)\n{\n0x07,\n0x07,\nZero,\nZero\n})", dsl);
        Assert.Contains("Scope (\\_SB)\n{\nDevice (PCI0)\n{\nName (_HID, EisaId (\"PNP0A08\"))\nName (_CID, EisaId (\"PNP0A03\"))\n" +
            "Name (_SEG, Zero)\nName (_BBN, Zero)\nName (_UID, Zero)\nName (_CRS, ResourceTemplate ()\n{\n" +
            "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,\n0x0000,\n0x0000,\n0x0000,\n0x0000,\n0x0001,\n,, )\n" +
            "IO (Decode16,\n0x0CF8,\n0x0CF8,\n0x01,\n0x08,\n)\n" +
            "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,\n0x0000,\n0x0000,\n0x0CF7,\n0x0000,\n0x0CF8,\n,, , TypeStatic, DenseTranslation)\n" +
            "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,\n0x0000,\n0xC000,\n0xFFFF,\n0x0000,\n0x4000,\n,, , TypeStatic, DenseTranslation)\n" +
            "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,\n0x00000000,\n0xD0000000,\n0xDFFFFFFF,\n0x00000000,\n0x10000000,\n,, , AddressRangeMemory, TypeStatic)\n" +
            "})\nName (_PRT, Package (0x80)\n{\nPackage (0x04)\n{\n0xFFFF,\nZero,\nZero,\n0x10\n},", dsl);
        Assert.Contains("Package (0x04)\n{\n0x001FFFFF,\n0x03,\nZero,\n0x12\n}\n})", dsl); // slot 31 INTD#: (31 + 3) % 4 = 2
        Assert.Contains("Device (MRES)\n{\nName (_HID, EisaId (\"PNP0C02\"))\nName (_UID, Zero)\nName (_CRS, ResourceTemplate ()\n{\n" +
            "Memory32Fixed (ReadWrite,\n0xC0000000,\n0x00100000,\n)\n})", dsl);
        Assert.Contains("Device (COM1)\n{\nName (_HID, EisaId (\"PNP0501\"))\nName (_UID, One)\nName (_CRS, ResourceTemplate ()\n{\n" +
            "IO (Decode16,\n0x03F8,\n0x03F8,\n0x01,\n0x08,\n)\nIRQNoFlags ()\n{4}\n})", dsl);
        Assert.Contains("Device (RTC)\n{\nName (_HID, EisaId (\"PNP0B00\"))", dsl);
        Assert.Contains("Device (KBD)\n{\nName (_HID, EisaId (\"PNP0303\"))", dsl);
        // ACPICA compiles its own disassembly back into the same AML, byte for byte (the header's
        // compiler id and checksum are iasl's own).
        Assert.Equal(dsdt[36..], recompiled![36..]);
    }

    [AcpicaFact("iasl")]
    public void Iasl_must_read_the_mcfg_as_one_ecam_range_for_bus_0()
    {
        var dsl = Disassemble(Find("MCFG"), "mcfg", out _);
        Assert.Matches(@"Signature : ""MCFG""", dsl);
        Assert.Matches(@"Base Address : 00000000C0000000", dsl);
        Assert.Matches(@"Segment Group Number : 0000", dsl);
        Assert.Matches(@"Start Bus Number : 00", dsl);
        Assert.Matches(@"End Bus Number : 00", dsl);
        Assert.DoesNotContain("Invalid", dsl);
    }
    /// <summary>
    /// ACPICA's acpiexec loads the DSDT into its namespace with the interpreter and the resource
    /// manager Linux uses (AcpiGetIrqRoutingTable for _PRT, AcpiGetCurrentResources for _CRS) and
    /// dumps what they read: 128 routing entries with no link device and the swizzled GSIs, and the
    /// root bridge's windows.
    /// </summary>
    [AcpicaFact("acpiexec")]
    public void Acpiexec_must_load_the_dsdt_and_read_the_routing_table_and_windows_linux_would_read()
    {
        var dir = Directory.CreateTempSubdirectory("actorvmm-acpiexec-");
        try
        {
            File.WriteAllBytes(Path.Combine(dir.FullName, "dsdt.aml"), Dsdt());
            var psi = new ProcessStartInfo("acpiexec", ["-b", "resources \\_SB.PCI0", "dsdt.aml"])
                { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = dir.FullName };
            using var exec = Process.Start(psi)!;
            var output = exec.StandardOutput.ReadToEnd() + exec.StandardError.ReadToEnd();
            Assert.True(exec.WaitForExit(30_000), "acpiexec did not finish");
            var text = System.Text.RegularExpressions.Regex.Replace(output, @"[ \t]+", " ");

            Assert.Contains("ACPI: 1 ACPI AML tables successfully acquired and loaded", text);
            Assert.DoesNotContain("ACPI Error", text);
            Assert.DoesNotContain("ACPI Warning", text);
            var routes = System.Text.RegularExpressions.Regex.Matches(text,
                @"PCI IRQ Routing Table Package\n Address : ([0-9A-F]+)\n Pin : ([0-9A-F]+)\n Source : \[NULL NAMESTRING\]\n Source Index : ([0-9A-F]+)");
            Assert.Equal(128, routes.Count);
            foreach (System.Text.RegularExpressions.Match m in routes)
            {
                var slot = (int)(Convert.ToUInt64(m.Groups[1].Value, 16) >> 16);
                var pin = Convert.ToInt32(m.Groups[2].Value, 16);
                Assert.Equal(16 + (slot + pin) % 4, Convert.ToInt32(m.Groups[3].Value, 16));
            }
            Assert.Contains("Resource Type : Bus Number Range\n Consumer/Producer : ResourceProducer", text);
            Assert.Contains("I/O Resource\n Address Decoding : Decode16\n Address Minimum : 0CF8\n Address Maximum : 0CF8\n Alignment : 01\n Address Length : 08", text);
            Assert.Contains("Address Minimum : 0000\n Address Maximum : 0CF7", text);
            Assert.Contains("Address Minimum : C000\n Address Maximum : FFFF", text);
            Assert.Contains("Address Minimum : D0000000\n Address Maximum : DFFFFFFF", text);
        }
        finally { dir.Delete(recursive: true); }
    }
}

/// <summary>A fact that needs one of ACPICA's tools (iasl, acpiexec; Debian: acpica-tools) on the PATH; skipped when it is not there.</summary>
public sealed class AcpicaFactAttribute : FactAttribute
{
    public AcpicaFactAttribute(string tool)
    {
        var path = Environment.GetEnvironmentVariable("PATH") ?? "";
        if (!path.Split(':').Any(d => d.Length > 0 && File.Exists(Path.Combine(d, tool))))
            Skip = $"ACPICA's {tool} is not installed (Debian package acpica-tools)";
    }
}
