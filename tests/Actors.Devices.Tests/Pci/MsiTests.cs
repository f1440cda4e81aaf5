using ActorVmm.Devices.Pci;

namespace ActorVmm.Devices.Tests.Pci;

/// <summary>MSI (PCI Local Bus 3.0 §6.8.1) and MSI-X (§6.8.2) register by register, driven as a
/// guest drives them: through configuration writes and (MSI-X) BAR accesses.</summary>
public sealed class MsiTests
{
    private readonly List<MsiMessage> _sent = [];

    private static PciConfigSpace Function() => new(new PciIds(0x1AF4, 0x1041, 0x02, 0x00), PciInterruptPin.IntA);

    // ---- MSI ----

    private (PciConfigSpace Config, MsiCapability Msi) WithMsi(int vectors = 4, bool address64 = true)
    {
        var config = Function();
        var msi = new MsiCapability(config, vectors, _sent.Add, address64);
        return (config, msi);
    }

    /// <summary>What Linux does to program MSI: address, data, MME, enable, bus master.</summary>
    private static void ProgramMsi(PciConfigSpace config, MsiCapability msi, ulong address, ushort data, int mme = 0)
    {
        var at = msi.Offset;
        config.Write(at + 4, 4, (uint)address);
        config.Write(at + 8, 4, (uint)(address >> 32));
        config.Write(at + 0xC, 2, data);
        config.Write(at + 2, 2, (uint)(mme << 4) | MsiCapability.ControlEnable);
        config.Write(0x04, 2, PciConfigSpace.CommandBusMaster);
    }

    [Fact]
    public void Msi_capability_layout_and_read_only_bits()
    {
        var (config, msi) = WithMsi(vectors: 8);

        Assert.Equal(0x40, msi.Offset);
        Assert.Equal(0x40u, config.Read(0x34, 1));
        Assert.Equal(0x05u, config.Read(0x40, 1));
        Assert.Equal(0x0186u, config.Read(0x42, 2)); // per-vector masking, 64-bit, MMC = 3 (8 vectors), disabled

        config.Write(0x42, 2, 0xFFFF);
        Assert.Equal(0x01F7u, config.Read(0x42, 2)); // enable and MME=7 written, the rest held
        config.Write(0x44, 4, 0xFFFF_FFFF);
        Assert.Equal(0xFFFF_FFFCu, config.Read(0x44, 4));
        config.Write(0x4C, 4, 0xFFFF_FFFF);
        Assert.Equal(0xFFFFu, config.Read(0x4C, 4)); // 16 data bits, the upper half reserved
        config.Write(0x50, 4, 0xFFFF_FFFF);
        Assert.Equal(0xFFu, config.Read(0x50, 4)); // one mask bit per capable vector
        config.Write(0x54, 4, 0xFFFF_FFFF);
        Assert.Equal(0u, config.Read(0x54, 4)); // pending bits are read-only
        Assert.Equal(8, msi.EnabledVectors); // MME 7 > MMC 3: clamped
    }

    [Fact]
    public void Msi_32bit_layout_moves_data_and_mask_up()
    {
        var (config, msi) = WithMsi(vectors: 1, address64: false);

        Assert.Equal(0x0100u, config.Read(msi.Offset + 2, 2));
        config.Write(msi.Offset + 4, 4, 0xFEE0_0000);
        config.Write(msi.Offset + 8, 2, 0x4041);
        config.Write(msi.Offset + 2, 2, MsiCapability.ControlEnable);
        config.Write(0x04, 2, PciConfigSpace.CommandBusMaster);

        Assert.True(msi.Signal(0));
        Assert.Equal([new MsiMessage(0xFEE0_0000, 0x4041)], _sent);
    }

    [Fact]
    public void Msi_sends_the_programmed_message_with_the_vector_in_the_low_data_bits()
    {
        var (config, msi) = WithMsi(vectors: 4);
        ProgramMsi(config, msi, 0xFEE0_1000, 0x4030, mme: 2);

        Assert.True(msi.Signal(0));
        Assert.True(msi.Signal(3));
        Assert.False(msi.Signal(4)); // beyond the enabled vectors

        Assert.Equal([new MsiMessage(0xFEE0_1000, 0x4030), new MsiMessage(0xFEE0_1000, 0x4033)], _sent);
    }

    [Fact]
    public void Msi_sends_nothing_while_disabled_or_without_bus_mastering()
    {
        var (config, msi) = WithMsi();

        Assert.False(msi.Signal(0));
        ProgramMsi(config, msi, 0xFEE0_0000, 0x41);
        config.Write(0x04, 2, 0);
        Assert.False(msi.Signal(0));
        Assert.Empty(_sent);
        Assert.Equal(0u, msi.PendingBits);
    }

    [Fact]
    public void Msi_masked_vector_becomes_pending_and_is_sent_on_unmask()
    {
        var (config, msi) = WithMsi(vectors: 4);
        ProgramMsi(config, msi, 0xFEE0_0000, 0x50, mme: 2);
        config.Write(msi.Offset + 0x10, 4, 0b0100);

        Assert.False(msi.Signal(2));
        Assert.Empty(_sent);
        Assert.Equal(0b0100u, config.Read(msi.Offset + 0x14, 4));

        config.Write(msi.Offset + 0x10, 4, 0);

        Assert.Equal([new MsiMessage(0xFEE0_0000, 0x52)], _sent);
        Assert.Equal(0u, config.Read(msi.Offset + 0x14, 4));
    }

    [Fact]
    public void Msi_enabled_suppresses_intx()
    {
        var (config, msi) = WithMsi();
        var line = new RecordingInterruptLine();
        config.ConnectIntx(line);
        config.SetIntx(true);
        Assert.True(line.Level);

        ProgramMsi(config, msi, 0xFEE0_0000, 0x41);

        Assert.False(line.Level);
    }

    // ---- MSI-X ----

    private const int TableBar = 1;
    private const uint TableOffset = 0x2000;
    private const uint PbaOffset = 0x3000;

    private (PciConfigSpace Config, MsiXCapability MsiX) WithMsiX(int vectors = 3)
    {
        var config = Function();
        config.AddMemoryBar32(TableBar, 0x4000);
        var msix = new MsiXCapability(config, vectors, TableBar, TableOffset, TableBar, PbaOffset, _sent.Add);
        return (config, msix);
    }

    private static void WriteEntry(MsiXCapability msix, int vector, ulong address, uint data, bool masked)
    {
        var at = TableOffset + (ulong)vector * 16;
        Assert.True(msix.TryWriteBar(TableBar, at, 4, (uint)address));
        Assert.True(msix.TryWriteBar(TableBar, at + 4, 4, address >> 32));
        Assert.True(msix.TryWriteBar(TableBar, at + 8, 4, data));
        Assert.True(msix.TryWriteBar(TableBar, at + 12, 4, masked ? 1u : 0u));
    }

    private static void EnableMsiX(PciConfigSpace config, MsiXCapability msix, bool functionMask = false)
    {
        config.Write(0x04, 2, PciConfigSpace.CommandBusMaster | PciConfigSpace.CommandMemorySpace);
        config.Write(msix.Offset + 2, 2, MsiXCapability.ControlEnable | (functionMask ? MsiXCapability.ControlFunctionMask : 0u));
    }

    private static ulong ReadBar(MsiXCapability msix, ulong offset, int size)
    {
        Assert.True(msix.TryReadBar(TableBar, offset, size, out var value));
        return value;
    }

    [Fact]
    public void MsiX_capability_states_table_size_and_locations_read_only()
    {
        var (config, msix) = WithMsiX(vectors: 3);

        Assert.Equal(0x11u, config.Read(msix.Offset, 1));
        Assert.Equal(0x0002u, config.Read(msix.Offset + 2, 2)); // N - 1
        Assert.Equal(TableOffset | TableBar, config.Read(msix.Offset + 4, 4));
        Assert.Equal(PbaOffset | TableBar, config.Read(msix.Offset + 8, 4));

        config.Write(msix.Offset + 2, 2, 0xFFFF);
        config.Write(msix.Offset + 4, 4, 0);
        Assert.Equal(0xC002u, config.Read(msix.Offset + 2, 2));
        Assert.Equal(TableOffset | TableBar, config.Read(msix.Offset + 4, 4));
    }

    [Fact]
    public void MsiX_table_entries_start_masked_and_hold_what_is_written()
    {
        var (_, msix) = WithMsiX();

        Assert.Equal(1ul, ReadBar(msix, TableOffset + 12, 4));
        Assert.Equal(0ul, ReadBar(msix, TableOffset, 4));

        WriteEntry(msix, 1, 0x1_FEE0_0003, 0x4055, masked: false);

        Assert.Equal(0xFEE0_0000ul, ReadBar(msix, TableOffset + 16, 4)); // bits 1:0 read 0
        Assert.Equal(0x1_FEE0_0000ul, ReadBar(msix, TableOffset + 16, 8));
        Assert.Equal(0x4055ul, ReadBar(msix, TableOffset + 24, 4));
        Assert.Equal(0ul, ReadBar(msix, TableOffset + 28, 4));
        Assert.True(msix.TryWriteBar(TableBar, TableOffset + 28, 4, 0xFFFF_FFFF));
        Assert.Equal(1ul, ReadBar(msix, TableOffset + 28, 4)); // reserved vector control bits read 0
        Assert.True(msix.TryWriteBar(TableBar, TableOffset + 24, 8, 0x0000_0000_0000_4066));
        Assert.Equal(0x4066ul, ReadBar(msix, TableOffset + 24, 4));
        Assert.Equal(0ul, ReadBar(msix, TableOffset + 28, 4)); // the qword's upper dword unmasked it
    }

    [Fact]
    public void MsiX_sends_an_unmasked_vector_and_not_while_disabled_or_without_bus_mastering()
    {
        var (config, msix) = WithMsiX();
        WriteEntry(msix, 2, 0xFEE0_2000, 0x4077, masked: false);

        Assert.False(msix.Signal(2)); // disabled
        config.Write(msix.Offset + 2, 2, MsiXCapability.ControlEnable);
        Assert.False(msix.Signal(2)); // no bus mastering
        Assert.Empty(_sent);
        Assert.Equal(0ul, ReadBar(msix, PbaOffset, 8));

        config.Write(0x04, 2, PciConfigSpace.CommandBusMaster);
        Assert.True(msix.Signal(2));
        Assert.False(msix.Signal(3));  // no such vector
        Assert.False(msix.Signal(-1));
        Assert.Equal([new MsiMessage(0xFEE0_2000, 0x4077)], _sent);
    }

    [Fact]
    public void MsiX_masked_vector_sets_its_pba_bit_and_is_sent_when_unmasked()
    {
        var (config, msix) = WithMsiX();
        EnableMsiX(config, msix);
        WriteEntry(msix, 1, 0xFEE0_0000, 0x4031, masked: true);

        Assert.False(msix.Signal(1));
        Assert.Equal(0b10ul, ReadBar(msix, PbaOffset, 8));
        Assert.Empty(_sent);

        Assert.True(msix.TryWriteBar(TableBar, TableOffset + 16 + 12, 4, 0));

        Assert.Equal([new MsiMessage(0xFEE0_0000, 0x4031)], _sent);
        Assert.Equal(0ul, ReadBar(msix, PbaOffset, 8));
    }

    [Fact]
    public void MsiX_function_mask_holds_every_vector_pending_until_cleared()
    {
        var (config, msix) = WithMsiX();
        WriteEntry(msix, 0, 0xFEE0_0000, 0x40, masked: false);
        WriteEntry(msix, 2, 0xFEE0_0000, 0x42, masked: true);
        EnableMsiX(config, msix, functionMask: true);

        Assert.False(msix.Signal(0));
        Assert.False(msix.Signal(2));
        Assert.Equal(0b101ul, ReadBar(msix, PbaOffset, 8));

        config.Write(msix.Offset + 2, 2, MsiXCapability.ControlEnable); // function mask off

        Assert.Equal([new MsiMessage(0xFEE0_0000, 0x40)], _sent); // vector 2 is still masked by its entry
        Assert.Equal(0b100ul, ReadBar(msix, PbaOffset, 8));
    }

    [Fact]
    public void MsiX_pba_is_read_only_and_accesses_outside_table_and_pba_are_not_claimed()
    {
        var (config, msix) = WithMsiX();
        EnableMsiX(config, msix);
        msix.Signal(0);

        Assert.True(msix.TryWriteBar(TableBar, PbaOffset, 8, 0));
        Assert.Equal(1ul, ReadBar(msix, PbaOffset, 8));

        Assert.False(msix.TryReadBar(TableBar, 0, 4, out _));
        Assert.False(msix.TryReadBar(TableBar, TableOffset + 3 * 16, 4, out _));
        Assert.False(msix.TryReadBar(0, TableOffset, 4, out _));
        Assert.False(msix.TryWriteBar(TableBar, PbaOffset + 8, 4, 0));
    }

    [Fact]
    public void MsiX_table_writes_of_the_wrong_size_or_alignment_are_ignored_and_nothing_throws()
    {
        var (config, msix) = WithMsiX();
        EnableMsiX(config, msix);
        var before = msix.Table.State();

        foreach (var size in new[] { -1, 0, 1, 2, 3, 5, 16 })
            for (ulong offset = 0; offset < 48; offset++)
                msix.TryWriteBar(TableBar, TableOffset + offset, size, ulong.MaxValue);
        for (ulong offset = 1; offset < 48; offset++)
            if (offset % 4 != 0) msix.TryWriteBar(TableBar, TableOffset + offset, 4, ulong.MaxValue);
        msix.TryWriteBar(TableBar, TableOffset + 4, 8, ulong.MaxValue); // a qword not qword-aligned
        msix.TryWriteBar(TableBar, TableOffset + 44, 8, ulong.MaxValue); // runs past the table

        Assert.Equal(before.Entries, msix.Table.State().Entries);

        Assert.Equal(0x01ul, ReadBar(msix, TableOffset + 12, 1)); // narrow reads see the bytes
        Assert.Equal(0xFFFF_FFFF_0000_0000ul | ReadBar(msix, TableOffset + 44, 4), ReadBar(msix, TableOffset + 44, 8));
        Assert.Equal(ulong.MaxValue, ReadBar(msix, TableOffset, 3));
        Assert.Equal(ulong.MaxValue, ReadBar(msix, TableOffset, 0));
        msix.TryReadBar(TableBar, ulong.MaxValue, 8, out _);
        msix.TryWriteBar(TableBar, ulong.MaxValue, 8, 0);
    }

    [Fact]
    public void MsiX_enabled_suppresses_intx()
    {
        var (config, msix) = WithMsiX();
        var line = new RecordingInterruptLine();
        config.ConnectIntx(line);
        config.SetIntx(true);

        EnableMsiX(config, msix);

        Assert.False(line.Level);
    }

    [Fact]
    public void MsiX_table_state_round_trips()
    {
        var (config, msix) = WithMsiX();
        EnableMsiX(config, msix);
        WriteEntry(msix, 1, 0xFEE0_0000, 0x31, masked: true);
        msix.Signal(1);

        var (_, copy) = WithMsiX();
        copy.Table.Restore(msix.Table.State());

        Assert.Equal(msix.Table.State().Entries, copy.Table.State().Entries);
        Assert.True(copy.Table.IsPending(1));
    }
}
