using ActorVmm.Devices;
using System.Buffers.Binary;
using System.Text;
using Akka.Configuration;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Host.Tests;

/// <summary>The MP table and the ACPI RSDP/RSDT/XSDT/MADT as written into guest memory, byte by byte.</summary>
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
    public void Mp_table_must_describe_every_vcpu_the_isa_bus_the_ioapic_and_the_isa_irqs()
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
        var bus = Assert.Single(entries, e => e[0] == PlatformTables.MpBus);
        Assert.Equal("ISA   ", Ascii(bus, 2, 6));
        var ioapic = Assert.Single(entries, e => e[0] == PlatformTables.MpIoApic);
        Assert.Equal(new byte[] { 2, 3, 0x20, 1, 0x00, 0x00, 0xC0, 0xFE }, ioapic);

        var irqs = entries.Where(e => e[0] == PlatformTables.MpIoInterrupt).ToDictionary(e => (int)e[5], e => (int)e[7]);
        Assert.Equal(15, irqs.Count); // ISA IRQs 0-15 but the cascade
        Assert.Equal(2, irqs[0]);
        Assert.False(irqs.ContainsKey(2));
        for (var irq = 1; irq < 16; irq++)
            if (irq != 2) Assert.Equal(irq, irqs[irq]);
        Assert.All(entries.Where(e => e[0] == PlatformTables.MpIoInterrupt), e => Assert.Equal(3, e[6]));
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
        Assert.Equal(40, rsdt.Length);
        Assert.Equal(44, xsdt.Length);
        Assert.Equal(U32(rsdt, 36), U64(xsdt, 36));

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
        var over = Assert.Single(entries, e => e[0] == PlatformTables.MadtSourceOverride);
        Assert.Equal(0, over[2]); // ISA
        Assert.Equal(0, over[3]); // IRQ 0
        Assert.Equal(2u, U32(over, 4)); // GSI 2
        var nmi = Assert.Single(entries, e => e[0] == PlatformTables.MadtLocalApicNmi);
        Assert.Equal(1, nmi[5]); // LINT1
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
