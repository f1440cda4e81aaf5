using ActorVmm.Memory;

namespace ActorVmm.Actors.Memory.Tests;

public class PmapTests
{
    [Fact]
    public void X86_layout_has_P_RW_U_A_D_at_0_1_2_5_6()
    {
        var b = PmapBits.For(PmapType.X86, PmapFlags.UffdEmulated);
        Assert.Equal(0b0000_0001UL, b.Valid);
        Assert.Equal(0b0000_0010UL, b.ReadWrite);
        Assert.Equal(0b0000_0100UL, b.User);
        Assert.Equal(0b0010_0000UL, b.Accessed);
        Assert.Equal(0b0100_0000UL, b.Modified);
        Assert.Equal(1UL << 9, b.Held); // PG_W
    }

    [Fact]
    public void Ept_layout_with_hardware_AD_has_RWX_0_1_2_A_8_D_9()
    {
        var b = PmapBits.For(PmapType.Ept, PmapFlags.Untracked);
        Assert.Equal(1UL << 0, b.Valid);
        Assert.Equal(1UL << 1, b.ReadWrite);
        Assert.Equal(1UL << 2, b.Execute);
        Assert.Equal(1UL << 8, b.Accessed);
        Assert.Equal(1UL << 9, b.Modified);
    }

    [Fact]
    public void Ept_layout_with_AD_emulation_uses_software_52_53_and_hardware_read_write_as_A_and_M()
    {
        var b = PmapBits.For(PmapType.Ept, PmapFlags.UffdEmulated);
        Assert.Equal(1UL << 52, b.Valid);      // EPT_PG_EMUL_V
        Assert.Equal(1UL << 53, b.ReadWrite);  // EPT_PG_EMUL_RW
        Assert.Equal(1UL << 0, b.Accessed);    // EPT_PG_RD
        Assert.Equal(1UL << 1, b.Modified);    // EPT_PG_WR
        Assert.Equal(0UL, (b.Held | b.Swapped) & (b.Valid | b.ReadWrite | b.Accessed | b.Modified | b.Execute | PmapBits.FrameMask));
    }

    [Fact]
    public void Masks_depend_on_the_type_chosen_at_run_time()
    {
        var types = new[] { PmapType.X86, PmapType.Ept };
        var modified = types.Select(t => new Pmap(t, PmapFlags.Untracked, 1).Bits.Modified).ToArray();
        Assert.Equal([1UL << 6, 1UL << 9], modified);
    }

    [Fact]
    public void Entry_follows_resident_accessed_modified_swapped_held()
    {
        var pmap = new Pmap(PmapType.Ept, PmapFlags.UffdEmulated, 4);
        var b = pmap.Bits;
        pmap.SetResident(1, 0x5000, writable: true);
        pmap.SetAccessed(1, true);
        Assert.Equal(b.Valid | b.ReadWrite | b.Accessed | b.Execute | 0x5000, pmap[1]);
        Assert.True(pmap.IsWriteProtected(1));
        pmap.SetModified(1, true);
        Assert.False(pmap.IsWriteProtected(1));
        Assert.Equal(1UL, pmap.ResidentPages);

        pmap.SetSwapped(1, 0x1000);
        Assert.Equal(b.Swapped | b.Modified | 0x1000, pmap[1]); // dirty survives the swap
        Assert.Equal((0UL, 1UL), (pmap.ResidentPages, pmap.SwappedPages));

        pmap.SetHeld(2, true);
        Assert.True(pmap.IsHeld(2));
        Assert.Equal(PageAD.Dirty, pmap.AccessedDirty(1));
    }
}
