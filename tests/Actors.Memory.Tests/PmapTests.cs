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

    [Theory]
    [InlineData(PmapType.X86, true)]
    [InlineData(PmapType.Ept, true)]
    [InlineData(PmapType.Ept, false)]
    public void Counts_of_resident_swapped_accessed_dirty_and_superpage_entries_match_a_recount(PmapType type, bool emulated)
    {
        var flags = (emulated ? PmapFlags.UffdEmulated : PmapFlags.Untracked) with { Superpages = true };
        var pmap = new Pmap(type, flags, 64);
        var b = pmap.Bits;
        var random = new Random(4);
        for (var step = 0; step < 5000; step++)
        {
            var p = (ulong)random.Next(64);
            var on = random.Next(2) == 0;
            switch (random.Next(7))
            {
                case 0: pmap.SetResident(p, p << 12, writable: on); break;
                case 1: pmap.SetSwapped(p, p << 12); break;
                case 2: pmap.SetEmpty(p); break;
                case 3: pmap.SetAccessed(p, on); break;
                case 4: pmap.SetModified(p, on); break;
                case 5: pmap.SetHeld(p, on); break;
                case 6: pmap.SetSuperpage(p, on); break;
            }
            ulong Recount(ulong bit) => (ulong)pmap.Snapshot(0, 64).Count(e => (e & bit) != 0);
            Assert.Equal(
                (Recount(b.Valid), Recount(b.Swapped), Recount(b.Accessed), Recount(b.Modified), Recount(b.Superpage)),
                (pmap.ResidentPages, pmap.SwappedPages, pmap.AccessedPages, pmap.DirtyPages, pmap.SuperpageBackedPages));
        }
        Assert.InRange(pmap.AccessedPages, 1UL, 63UL); // the walk reached mixed states, not all-clear
    }

    [Fact]
    public void Superpage_is_PS_bit_7_in_both_layouts_and_refused_by_a_pmap_without_superpages()
    {
        Assert.Equal(1UL << 7, PmapBits.For(PmapType.X86, PmapFlags.UffdEmulated).Superpage);
        Assert.Equal(1UL << 7, PmapBits.For(PmapType.Ept, PmapFlags.UffdEmulated).Superpage);
        Assert.Equal(1UL << 7, PmapBits.For(PmapType.Ept, PmapFlags.Untracked).Superpage);
        var none = new Pmap(PmapType.Ept, PmapFlags.UffdEmulated, 4);
        Assert.Throws<InvalidOperationException>(() => none.SetSuperpage(0, true));
        none.SetSuperpage(0, false); // clearing is always allowed

        var backed = new Pmap(PmapType.Ept, PmapFlags.Untracked with { Superpages = true }, 4);
        backed.SetResident(1, 0x1000, writable: true);
        backed.SetSuperpage(1, true);
        Assert.True(backed.IsSuperpage(1));
        backed.SetSwapped(1, 0x1000); // punched out of the memfd: no longer in a huge page
        Assert.Equal((false, 0UL), (backed.IsSuperpage(1), backed.SuperpageBackedPages));
    }
}
