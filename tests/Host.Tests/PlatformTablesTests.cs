using ActorVmm.Devices;
using ActorVmm.Devices.Pci;
using System.Buffers.Binary;
using System.Text;
using Akka.Configuration;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Host.Tests;

/// <summary>The MP table and the ACPI RSDP/RSDT/XSDT/MADT/FADT/FACS/DSDT as written into guest memory, byte by byte.</summary>
public sealed class PlatformTablesTests : IDisposable
{
    private readonly GuestMemoryMap _memory = VmspaceLayout.Build(4 << 20);

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

    /// <summary>Finds a signature on 16-byte boundaries, as an OS scans the BIOS area.</summary>
    private ulong Scan(string signature, ulong from, ulong to)
    {
        for (var a = from; a < to; a += 16)
            if (Ascii(Read(a, signature.Length), 0, signature.Length) == signature) return a;
        throw new Xunit.Sdk.XunitException($"{signature} not found in 0x{from:X}-0x{to:X}");
    }

    [Fact]
    public void Mp_table_must_describe_every_vcpu_the_buses_the_ioapic_the_isa_irqs_and_the_pci_intx_routing()
    {
        PlatformTables.Write(_memory, cpus: 3, ioApicId: 3);
        var fp = Read(Scan("_MP_", 0xF0000, 0x100000), 16);
        Assert.Equal(0, Sum(fp));
        Assert.Equal(1, fp[8]);
        Assert.Equal(4, fp[9]);
        Assert.Equal(0, fp[11]); // a configuration table, not a default configuration

        var at = U32(fp, 4);
        var header = Read(at, 44);
        Assert.Equal("PCMP", Ascii(header, 0, 4));
        var table = Read(at, U16(header, 4));
        Assert.Equal(0, Sum(table));
        Assert.Equal(0xFEE0_0000u, U32(table, 36));
        var count = U16(table, 34);

        var entries = new List<byte[]>();
        var p = 44;
        for (var i = 0; i < count; i++)
        {
            var len = table[p] == PlatformTables.MpProcessor ? 20 : 8;
            entries.Add(table[p..(p + len)]);
            p += len;
        }
        Assert.Equal(table.Length, p);

        var cpus = entries.Where(e => e[0] == PlatformTables.MpProcessor).ToList();
        Assert.Equal([0, 1, 2], cpus.Select(e => (int)e[1]));
        Assert.Equal([0b11, 0b01, 0b01], cpus.Select(e => (int)e[3])); // enabled; BSP only on vcpu 0
        Assert.Equal(entries.OrderBy(e => e[0]), entries); // sorted by entry type (MP §4.3)
        var buses = entries.Where(e => e[0] == PlatformTables.MpBus).Select(e => (e[1], Ascii(e, 2, 6))).ToList();
        Assert.Equal([((byte)0, "PCI   "), ((byte)1, "ISA   ")], buses); // PCI bus 0 has ID 0 (MP §D.3)
        var ioapic = Assert.Single(entries, e => e[0] == PlatformTables.MpIoApic);
        Assert.Equal(new byte[] { 2, 3, 0x20, 1, 0x00, 0x00, 0xC0, 0xFE }, ioapic);

        var io = entries.Where(e => e[0] == PlatformTables.MpIoInterrupt).ToList();
        Assert.All(io, e => Assert.Equal(3, e[6])); // to the IOAPIC
        Assert.All(io, e => Assert.Equal(0, e[1])); // INT: vectored through the IOAPIC
        var isa = io.Where(e => e[4] == 1).ToList();
        Assert.All(isa, e => Assert.Equal(0, U16(e, 2))); // conforming to the ISA bus: edge, active high
        var irqs = isa.ToDictionary(e => (int)e[5], e => (int)e[7]);
        Assert.Equal(15, irqs.Count); // ISA IRQs 0-15 but the cascade
        Assert.Equal(2, irqs[0]);
        Assert.False(irqs.ContainsKey(2));
        for (var irq = 1; irq < 16; irq++)
            if (irq != 2) Assert.Equal(irq, irqs[irq]);

        // PCI: source bus IRQ = device << 2 | pin (0 = INTA#), level and active low, on the pin the
        // _PRT names: GSI 16 + (device + pin) mod 4.
        var pci = io.Where(e => e[4] == 0).ToList();
        Assert.Equal(io.Count, isa.Count + pci.Count);
        Assert.Equal(32 * 4, pci.Count);
        Assert.All(pci, e => Assert.Equal(0b1111, U16(e, 2)));
        var routes = pci.ToDictionary(e => (e[5] >> 2, e[5] & 3), e => (int)e[7]);
        for (var slot = 0; slot < 32; slot++)
            for (var pin = 0; pin < 4; pin++)
            {
                Assert.Equal(16 + (slot + pin) % 4, routes[(slot, pin)]);
                // ... the pin the bus model drives for that function's pin
                Assert.Equal(PciInterruptRouting.Gsi(slot, (PciInterruptPin)(pin + 1)), (uint)routes[(slot, pin)]);
            }
        var locals = entries.Where(e => e[0] == PlatformTables.MpLocalInterrupt).Select(e => (e[1], e[7])).ToList();
        Assert.Equal([((byte)3, (byte)0), ((byte)1, (byte)1)], locals); // ExtINT → LINT0, NMI → LINT1
    }

    [Fact]
    public void Acpi_tables_must_lead_from_the_rsdp_to_a_madt_with_every_vcpu_the_ioapic_and_irq0_on_gsi2()
    {
        PlatformTables.Write(_memory, cpus: 4, ioApicId: 4);
        var rsdp = Read(Scan("RSD PTR ", 0xE0000, 0x100000), 36);
        Assert.Equal(0, Sum(rsdp[..20]));
        Assert.Equal(0, Sum(rsdp));
        Assert.Equal(2, rsdp[15]);
        Assert.Equal(36u, U32(rsdp, 20));

        byte[] Table(ulong address)
        {
            var len = U32(Read(address, 8), 4);
            var t = Read(address, (int)len);
            Assert.Equal(0, Sum(t));
            return t;
        }

        var rsdt = Table(U32(rsdp, 16));
        Assert.Equal("RSDT", Ascii(rsdt, 0, 4));
        var xsdt = Table(U64(rsdp, 24));
        Assert.Equal("XSDT", Ascii(xsdt, 0, 4));
        Assert.Equal(48, rsdt.Length); // MADT, FADT, MCFG
        Assert.Equal(60, xsdt.Length);
        Assert.Equal(U32(rsdt, 36), U64(xsdt, 36));
        Assert.Equal(U32(rsdt, 40), U64(xsdt, 44));
        Assert.Equal(U32(rsdt, 44), U64(xsdt, 52));

        var madt = Table(U32(rsdt, 36));
        Assert.Equal("APIC", Ascii(madt, 0, 4));
        Assert.Equal(0xFEE0_0000u, U32(madt, 36));
        Assert.Equal(1u, U32(madt, 40)); // PCAT_COMPAT
        var entries = new List<byte[]>();
        for (var p = 44; p < madt.Length; p += madt[p + 1]) entries.Add(madt[p..(p + madt[p + 1])]);

        var lapics = entries.Where(e => e[0] == PlatformTables.MadtLocalApic).ToList();
        Assert.Equal([0, 1, 2, 3], lapics.Select(e => (int)e[3]));
        Assert.All(lapics, e => Assert.Equal(1u, U32(e, 4)));
        var ioapic = Assert.Single(entries, e => e[0] == PlatformTables.MadtIoApic);
        Assert.Equal(4, ioapic[2]);
        Assert.Equal(0xFEC0_0000u, U32(ioapic, 4));
        Assert.Equal(0u, U32(ioapic, 8));
        var overrides = entries.Where(e => e[0] == PlatformTables.MadtSourceOverride).ToList();
        Assert.Equal(2, overrides.Count);
        var over = overrides[0];
        Assert.Equal(0, over[2]); // ISA
        Assert.Equal(0, over[3]); // IRQ 0
        Assert.Equal(2u, U32(over, 4)); // GSI 2
        Assert.Equal(0, U16(over, 8)); // conforming
        var sci = overrides[1];
        Assert.Equal(0, sci[2]);
        Assert.Equal(9, sci[3]); // IRQ 9, the SCI
        Assert.Equal(9u, U32(sci, 4));
        Assert.Equal(0b11_01, U16(sci, 8)); // level, active high
        var nmi = Assert.Single(entries, e => e[0] == PlatformTables.MadtLocalApicNmi);
        Assert.Equal(1, nmi[5]); // LINT1
    }

    private byte[] Table(ulong address)
    {
        var len = U32(Read(address, 8), 4);
        var t = Read(address, (int)len);
        Assert.Equal(0, Sum(t));
        return t;
    }

    /// <summary>The FADT, found as an OS finds it: RSDP → XSDT → the entry signed "FACP".</summary>
    private byte[] Fadt(out ulong address)
    {
        var rsdp = Read(Scan("RSD PTR ", 0xE0000, 0x100000), 36);
        var xsdt = Table(U64(rsdp, 24));
        for (var p = 36; p < xsdt.Length; p += 8)
        {
            address = U64(xsdt, p);
            if (Ascii(Read(address, 4), 0, 4) == "FACP") return Table(address);
        }
        throw new Xunit.Sdk.XunitException("no FACP in the XSDT");
    }

    /// <summary>A Generic Address Structure: (space, bit width, bit offset, access size, address).</summary>
    private static (int Space, int Width, int Offset, int Access, ulong Address) Gas(byte[] t, int at) =>
        (t[at], t[at + 1], t[at + 2], t[at + 3], U64(t, at + 4));

    [Fact]
    public void Fadt_must_be_listed_in_rsdt_and_xsdt_with_revision_6_and_a_right_checksum()
    {
        PlatformTables.Write(_memory, cpus: 2, ioApicId: 2);
        var fadt = Fadt(out var address);
        var rsdp = Read(Scan("RSD PTR ", 0xE0000, 0x100000), 36);
        var rsdt = Table(U32(rsdp, 16));
        Assert.Contains((uint)address, Enumerable.Range(0, (rsdt.Length - 36) / 4).Select(i => U32(rsdt, 36 + 4 * i)));

        Assert.Equal("FACP", Ascii(fadt, 0, 4));
        Assert.Equal(276, fadt.Length);
        Assert.Equal(276u, U32(fadt, 4));
        Assert.Equal(6, fadt[8]);   // major revision
        Assert.Equal(5, fadt[131]); // minor: ACPI 6.5
        Assert.Equal("ACTVMM", Ascii(fadt, 10, 6));
    }

    [Fact]
    public void Fadt_must_point_at_the_pm_block_in_its_32_bit_and_generic_address_fields()
    {
        PlatformTables.Write(_memory, cpus: 1, ioApicId: 1);
        var fadt = Fadt(out _);

        Assert.Equal(9, U16(fadt, 46));            // SCI_INT
        Assert.Equal(0u, U32(fadt, 48));           // SMI_CMD: no SMM, always in ACPI mode
        Assert.Equal(0, fadt[52] | fadt[53]);      // ACPI_ENABLE / ACPI_DISABLE
        Assert.Equal(0x600u, U32(fadt, 56));       // PM1a_EVT_BLK
        Assert.Equal(0u, U32(fadt, 60));           // no PM1b
        Assert.Equal(0x604u, U32(fadt, 64));       // PM1a_CNT_BLK
        Assert.Equal(0u, U32(fadt, 68));
        Assert.Equal(0u, U32(fadt, 72));           // no PM2
        Assert.Equal(0x608u, U32(fadt, 76));       // PM_TMR_BLK
        Assert.Equal(0u, U32(fadt, 80));           // no GPE0
        Assert.Equal(0u, U32(fadt, 84));           // no GPE1
        Assert.Equal(new byte[] { 4, 2, 0, 4, 0, 0 }, fadt[88..94]); // PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN, GPE0, GPE1

        Assert.Equal((1, 32, 0, 2, 0x600UL), Gas(fadt, 148)); // X_PM1a_EVT_BLK: I/O, 32 bits
        Assert.Equal((0, 0, 0, 0, 0UL), Gas(fadt, 160));      // X_PM1b_EVT_BLK
        Assert.Equal((1, 16, 0, 2, 0x604UL), Gas(fadt, 172)); // X_PM1a_CNT_BLK
        Assert.Equal((0, 0, 0, 0, 0UL), Gas(fadt, 184));
        Assert.Equal((0, 0, 0, 0, 0UL), Gas(fadt, 196));      // X_PM2_CNT_BLK
        Assert.Equal((1, 32, 0, 3, 0x608UL), Gas(fadt, 208)); // X_PM_TMR_BLK
        Assert.Equal((0, 0, 0, 0, 0UL), Gas(fadt, 220));      // X_GPE0_BLK

        // The same addresses as the PM device sits at.
        Assert.Equal(Platform.AcpiPm1EventBlock, U32(fadt, 56));
        Assert.Equal(Platform.AcpiPm1ControlBlock, U32(fadt, 64));
        Assert.Equal(Platform.AcpiPmTimerBlock, U32(fadt, 76));
        Assert.Equal(Platform.AcpiPmBase + AcpiPm.TimerOffset, Platform.AcpiPmTimerBlock);
        Assert.Equal(Platform.AcpiPmBase + AcpiPm.ControlOffset, Platform.AcpiPm1ControlBlock);
    }

    [Fact]
    public void Fadt_must_state_the_reset_register_the_legacy_devices_and_a_24_bit_timer()
    {
        PlatformTables.Write(_memory, cpus: 1, ioApicId: 1);
        var fadt = Fadt(out _);
        var flags = U32(fadt, 112);

        Assert.Equal((1, 8, 0, 1, 0xCF9UL), Gas(fadt, 116)); // RESET_REG: I/O, one byte
        Assert.Equal(0x06, fadt[128]);                        // RESET_VALUE
        Assert.NotEqual(0u, flags & (1u << 10));              // RESET_REG_SUP
        Assert.Equal(0u, flags & (1u << 8));                  // TMR_VAL_EXT = 0: 24 bits
        Assert.Equal(0u, flags & (1u << 20));                 // not HW_REDUCED_ACPI
        Assert.NotEqual(0u, flags & (1u << 4));               // no fixed power button
        var bootArch = U16(fadt, 109);
        Assert.Equal(0b011, bootArch & 0b011);                // LEGACY_DEVICES, 8042
        Assert.Equal(0x32, fadt[108]);                        // CENTURY: the RTC's century register
    }

    [Fact]
    public void Facs_must_be_64_byte_aligned_and_named_by_both_firmware_ctrl_fields()
    {
        PlatformTables.Write(_memory, cpus: 1, ioApicId: 1);
        var fadt = Fadt(out _);
        var facs = U32(fadt, 36);

        Assert.Equal(facs, U64(fadt, 132)); // X_FIRMWARE_CTRL: the same
        Assert.Equal(0u, facs % 64);
        var b = Read(facs, 64);
        Assert.Equal("FACS", Ascii(b, 0, 4));
        Assert.Equal(64u, U32(b, 4));
        Assert.Equal(0u, U32(b, 12));  // no waking vector
        Assert.Equal(0u, U32(b, 16));  // global lock free
        Assert.Equal(2, b[32]);        // version
    }

    [Fact]
    public void Dsdt_must_hold_the_s5_package_with_the_sleep_type_the_pm_block_powers_off_on()
    {
        PlatformTables.Write(_memory, cpus: 1, ioApicId: 1);
        var fadt = Fadt(out _);
        var address = U32(fadt, 40);
        Assert.Equal(address, U64(fadt, 140)); // X_DSDT: the same

        var dsdt = Table(address);
        Assert.Equal("DSDT", Ascii(dsdt, 0, 4));
        Assert.Equal((uint)dsdt.Length, U32(dsdt, 4));
        Assert.Equal(2, dsdt[8]);
        // Name (\_S5, Package (4) { 0x07, 0x07, Zero, Zero })
        byte[] s5 = [0x08, (byte)'\\', (byte)'_', (byte)'S', (byte)'5', (byte)'_', 0x12, 0x08, 0x04, 0x0A, 0x07, 0x0A, 0x07, 0x00, 0x00];
        Assert.Equal(s5, dsdt[36..(36 + s5.Length)]);
        Assert.Equal(AcpiPm.SleepTypeS5, s5[10]);
    }

    [Fact]
    public void Acpi_tables_must_fit_the_bios_area_without_overlapping()
    {
        PlatformTables.Write(_memory, cpus: 16, ioApicId: 0);
        var rsdp = Read(PlatformTables.Rsdp, 36);
        var spans = new List<(string Name, ulong Start, ulong End)>
        {
            ("RSDP", PlatformTables.Rsdp, PlatformTables.Rsdp + 36),
            ("FACS", PlatformTables.Facs, PlatformTables.Facs + 64),
        };
        foreach (var at in new ulong[] { U32(rsdp, 16), U64(rsdp, 24), PlatformTables.Madt, PlatformTables.Fadt, PlatformTables.Mcfg, PlatformTables.Dsdt })
            spans.Add((Ascii(Read(at, 4), 0, 4), at, at + U32(Read(at, 8), 4)));
        spans.Sort((a, b) => a.Start.CompareTo(b.Start));
        for (var i = 1; i < spans.Count; i++)
            Assert.True(spans[i - 1].End <= spans[i].Start, $"{spans[i - 1].Name} overlaps {spans[i].Name}");
        Assert.True(spans[^1].End <= PlatformTables.End, $"{spans[^1].Name} ends past the BIOS area");
        Assert.True(PlatformTables.Rsdp >= 0xE0000);
    }

    [Fact]
    public void Checksum_must_make_a_structure_sum_to_zero()
    {
        var b = new byte[] { 1, 2, 3, 250, 0 };
        b[4] = PlatformTables.Checksum(b);
        Assert.Equal(0, Sum(b));
    }

    [Fact]
    public void Lapic_setting_must_read_emulated_by_default_and_assisted_when_asked()
    {
        Assert.Equal(LapicMode.Emulated, VmConfig.From(VmConfig.Load(null)).Lapic);
        var assisted = ConfigurationFactory.ParseString("actorvmm.vm.lapic = assisted").WithFallback(VmConfig.Load(null));
        Assert.Equal(LapicMode.Assisted, VmConfig.From(assisted).Lapic);
        var bad = ConfigurationFactory.ParseString("actorvmm.vm.lapic = kernel").WithFallback(VmConfig.Load(null));
        var e = Assert.Throws<ConfigException>(() => VmConfig.From(bad));
        Assert.Contains("emulated or assisted", e.Message);
    }
    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(16)]
    public void The_ioapic_id_in_the_tables_is_the_one_its_register_holds(int cpus)
    {
        var id = PcPlatform.IoApicId(cpus);
        var ioapic = new IoApic(new NoApics(), id);
        ioapic.Write(0x00, 4, 0x00);                           // IOREGSEL: the ID register
        var register = (byte)((ioapic.Read(0x10, 4) >> 24) & 0xF);
        Assert.Equal(id, register);
        Assert.True(cpus < 16 ? id == cpus : id < 16);         // after the CPUs' IDs where 4 bits allow
    }

    private sealed class NoApics : IApicBus
    {
        public void Deliver(ApicMessage m) { }
    }
}
