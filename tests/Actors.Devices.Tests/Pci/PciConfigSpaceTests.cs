using ActorVmm.Devices.Pci;

namespace ActorVmm.Devices.Tests.Pci;

/// <summary>A type-0 configuration space register by register (PCI Local Bus 3.0 §6.2).</summary>
public sealed class PciConfigSpaceTests
{
    private static readonly PciIds Ids = new(0x1AF4, 0x1042, BaseClass: 0x01, SubClass: 0x80, ProgIf: 0x00, Revision: 1,
        SubsystemVendorId: 0x1AF4, SubsystemId: 0x0002);

    private static PciConfigSpace Function(PciInterruptPin pin = PciInterruptPin.IntA, bool extended = false) => new(Ids, pin, extended);

    [Fact]
    public void Header_holds_the_ids_class_code_and_pin_and_they_are_read_only()
    {
        var cs = Function();

        Assert.Equal(0x1042_1AF4u, cs.Read(0x00, 4));
        Assert.Equal(0x0180_0001u, cs.Read(0x08, 4)); // class 01/80/00, revision 1
        Assert.Equal(0x0002_1AF4u, cs.Read(0x2C, 4));
        Assert.Equal(0x00u, cs.Read(0x0E, 1));        // header type 0, single function
        Assert.Equal(0x01u, cs.Read(0x3D, 1));        // INTA#

        foreach (var offset in new[] { 0x00, 0x08, 0x2C, 0x0C })
            cs.Write(offset, 4, 0xFFFF_FFFF);
        cs.Write(0x3D, 1, 0x04);

        Assert.Equal(0x1042_1AF4u, cs.Read(0x00, 4));
        Assert.Equal(0x0180_0001u, cs.Read(0x08, 4));
        Assert.Equal(0x0002_1AF4u, cs.Read(0x2C, 4));
        Assert.Equal(0x0000_00FFu, cs.Read(0x0C, 4)); // only the cache line size is writable in this dword
        Assert.Equal(0x01u, cs.Read(0x3D, 1));
    }

    [Fact]
    public void Command_keeps_only_its_writable_bits()
    {
        var cs = Function();

        cs.Write(0x04, 2, 0xFFFF);

        Assert.Equal(0x0547u, cs.Read(0x04, 2)); // I/O, memory, bus master, parity, SERR#, interrupt disable
        cs.Write(0x04, 1, 0x00);
        Assert.Equal(0x0500u, cs.Read(0x04, 2)); // a byte write touches only its lane
    }

    [Fact]
    public void Status_error_bits_clear_on_writing_one_and_keep_on_writing_zero()
    {
        var cs = Function();
        cs.Set(0x06, 2, 0xF900 | PciConfigSpace.StatusCapabilitiesList);

        cs.Write(0x06, 2, 0x0000);
        Assert.Equal(0xF910u, cs.Read(0x06, 2));

        cs.Write(0x06, 2, 0x2100); // received master abort, master data parity error
        Assert.Equal(0xD810u, cs.Read(0x06, 2));

        cs.Write(0x04, 4, 0xFFFF_0000); // the dword write of command + status: command 0, every W1C bit cleared
        Assert.Equal(0x0010_0000u, cs.Read(0x04, 4));
    }

    [Fact]
    public void Interrupt_line_is_read_write_and_starts_at_ff()
    {
        var cs = Function();

        Assert.Equal(0xFFu, cs.Read(0x3C, 1));
        cs.Write(0x3C, 1, 11);
        Assert.Equal(11u, cs.Read(0x3C, 1));
        Assert.Equal(0x0000_010Bu, cs.Read(0x3C, 4)); // pin 1, Min_Gnt/Max_Lat 0
    }

    [Fact]
    public void Capabilities_are_linked_from_0x34_dword_aligned_with_status_bit_4()
    {
        var cs = Function();
        Assert.Equal(0u, cs.Read(0x06, 2) & PciConfigSpace.StatusCapabilitiesList);

        var first = cs.AddCapability(0x09, 6);
        var second = cs.AddCapability(0x05, 0x18);

        Assert.Equal(0x40, first);
        Assert.Equal(0x48, second); // 0x40 + 6 rounded up to a dword
        Assert.Equal(0x40u, cs.Read(0x34, 1));
        Assert.Equal(0x4809u, cs.Read(0x40, 2));
        Assert.Equal(0x0005u, cs.Read(0x48, 2));
        Assert.NotEqual(0u, cs.Read(0x06, 2) & PciConfigSpace.StatusCapabilitiesList);

        cs.Write(0x40, 2, 0xFFFF);
        cs.Write(0x34, 1, 0x80);
        Assert.Equal(0x4809u, cs.Read(0x40, 2));
        Assert.Equal(0x40u, cs.Read(0x34, 1));
    }

    [Fact]
    public void Memory32_bar_sizes_by_all_ones_and_keeps_its_type_bits()
    {
        var cs = Function();
        cs.AddMemoryBar32(0, 0x1000);
        cs.AddMemoryBar32(1, 0x10, prefetchable: true);

        cs.Write(0x10, 4, 0xFFFF_FFFF);
        cs.Write(0x14, 4, 0xFFFF_FFFF);

        Assert.Equal(0xFFFF_F000u, cs.Read(0x10, 4)); // ~(size - 1), type 00b, not prefetchable
        Assert.Equal(0xFFFF_FFF8u, cs.Read(0x14, 4)); // 16 bytes, prefetchable (bit 3)

        cs.Write(0x10, 4, 0xD000_0ABC); // the bits below the size do not stick
        Assert.Equal(0xD000_0000u, cs.Read(0x10, 4));
    }

    [Fact]
    public void Memory64_bar_sizes_over_both_dwords()
    {
        var cs = Function();
        cs.AddMemoryBar64(2, 0x4000, prefetchable: true);

        cs.Write(0x18, 4, 0xFFFF_FFFF);
        cs.Write(0x1C, 4, 0xFFFF_FFFF);

        Assert.Equal(0xFFFF_C00Cu, cs.Read(0x18, 4)); // 64-bit (10b in bits 2:1), prefetchable
        Assert.Equal(0xFFFF_FFFFu, cs.Read(0x1C, 4));

        cs.Write(0x18, 4, 0xD000_0000);
        cs.Write(0x1C, 4, 0x0000_0001);
        Assert.Equal(0xD000_000Cu, cs.Read(0x18, 4));
        Assert.Equal(0x1u, cs.Read(0x1C, 4));
        Assert.Same(cs.Bar(2), cs.Bar(3));
    }

    [Fact]
    public void Io_bar_sizes_with_bit_0_set()
    {
        var cs = Function();
        cs.AddIoBar(4, 0x20);

        cs.Write(0x20, 4, 0xFFFF_FFFF);

        Assert.Equal(0xFFFF_FFE1u, cs.Read(0x20, 4));
    }

    [Fact]
    public void Unimplemented_bars_and_the_expansion_rom_read_zero_after_sizing()
    {
        var cs = Function();

        for (var offset = 0x10; offset <= 0x24; offset += 4)
        {
            cs.Write(offset, 4, 0xFFFF_FFFF);
            Assert.Equal(0u, cs.Read(offset, 4));
        }
        cs.Write(0x30, 4, 0xFFFF_FFFF);
        Assert.Equal(0u, cs.Read(0x30, 4));
    }

    [Fact]
    public void A_bar_decodes_only_with_its_space_enabled_and_a_nonzero_address()
    {
        var cs = Function();
        cs.AddMemoryBar32(0, 0x1000);
        cs.AddIoBar(1, 0x40);
        cs.AddMemoryBar64(2, 0x2000);

        cs.Write(0x10, 4, 0xD000_1000);
        cs.Write(0x14, 4, 0xC040);
        Assert.Null(cs.DecodedAddress(0));
        Assert.Null(cs.DecodedAddress(1));

        cs.Write(0x04, 2, PciConfigSpace.CommandMemorySpace);
        Assert.Equal(0xD000_1000ul, cs.DecodedAddress(0));
        Assert.Null(cs.DecodedAddress(1));
        Assert.Null(cs.DecodedAddress(2)); // address 0: unassigned

        cs.Write(0x18, 4, 0x0000_2000);
        cs.Write(0x1C, 4, 0x0000_0008);
        cs.Write(0x04, 2, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandIoSpace);
        Assert.Equal(0xC040ul, cs.DecodedAddress(1));
        Assert.Equal(0x8_0000_2000ul, cs.DecodedAddress(2));
        Assert.Null(cs.DecodedAddress(3)); // the upper half is not a BAR of its own
        Assert.Null(cs.DecodedAddress(5));
    }

    [Fact]
    public void Absent_bytes_read_all_ones_and_ignore_writes()
    {
        var conventional = Function();
        var extended = Function(extended: true);

        Assert.Equal(0xFFFF_FFFFu, conventional.Read(0x100, 4));
        Assert.Equal(0xFFFF_FFFFu, conventional.Read(0xFFC, 4));
        Assert.Equal(0xFFFF_0000u, conventional.Read(0xFE, 4)); // 0xFE-0xFF present (0), 0x100-0x101 absent
        Assert.Equal(0u, extended.Read(0x100, 4)); // an empty extended capability list

        conventional.Write(0x100, 4, 0x1234_5678);
        extended.Write(0x100, 4, 0x1234_5678);
        Assert.Equal(0u, extended.Read(0x100, 4));
    }

    [Fact]
    public void Hostile_accesses_never_throw_and_change_nothing_they_may_not()
    {
        var cs = Function();
        cs.AddMemoryBar32(0, 0x1000);
        var before = cs.State().Bytes;

        foreach (var size in new[] { -1, 0, 5, 8, 1000 }) // sizes a configuration access cannot have
            foreach (var offset in new[] { -4, 0, 0x3F, 0xFF, 0x100, 0xFFF, 0x1000, int.MaxValue })
            {
                cs.Read(offset, size);
                cs.Write(offset, size, 0xFFFF_FFFF);
            }
        foreach (var size in new[] { 1, 2, 4 }) // good sizes at offsets past the end, negative or wrapping
            foreach (var offset in new[] { -4, -1, 0x100, 0xFFF, 0x1000, int.MaxValue - 1, int.MaxValue })
            {
                Assert.Equal((uint)AccessSize.AllOnes(size), cs.Read(offset, size));
                cs.Write(offset, size, 0);
            }

        Assert.Equal(before, cs.State().Bytes);
        Assert.Equal(0xFFFF_FFFFu, cs.Read(0x1000, 4));
        Assert.Equal(0x42_1AF4u, cs.Read(0, 3)); // an odd size (a CONFIG_DATA access running past 0xCFF) is read byte-wise
    }

    [Fact]
    public void Intx_follows_the_interrupt_condition_status_bit_and_interrupt_disable()
    {
        var cs = Function();
        var line = new RecordingInterruptLine();
        cs.ConnectIntx(line);

        cs.SetIntx(true);
        Assert.True(line.Level);
        Assert.NotEqual(0u, cs.Read(0x06, 2) & PciConfigSpace.StatusInterrupt);

        cs.Write(0x04, 2, PciConfigSpace.CommandInterruptDisable);
        Assert.False(line.Level);
        Assert.NotEqual(0u, cs.Read(0x06, 2) & PciConfigSpace.StatusInterrupt); // status still shows the condition

        cs.Write(0x04, 2, 0);
        Assert.True(line.Level);
        cs.SetIntx(false);
        Assert.False(line.Level);
        Assert.Equal(0u, cs.Read(0x06, 2) & PciConfigSpace.StatusInterrupt);
    }

    [Fact]
    public void State_round_trips_into_a_function_built_the_same_way()
    {
        var cs = Function();
        cs.AddMemoryBar32(0, 0x1000);
        cs.Write(0x10, 4, 0xD000_0000);
        cs.Write(0x04, 2, 0x0002);
        cs.Write(0x3C, 1, 17);

        var copy = Function();
        copy.AddMemoryBar32(0, 0x1000);
        copy.Restore(cs.State());

        Assert.Equal(cs.State().Bytes, copy.State().Bytes);
        Assert.Equal(0xD000_0000ul, copy.DecodedAddress(0));
    }
}
