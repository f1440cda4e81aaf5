using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// The pager's jobs called directly (no actor), over a real memfd, userfaultfd and swap file: host
/// access, holds and reclaim. No guest thread touches the guest view here.
/// </summary>
public sealed class PagerJobsTests : IDisposable
{
    private const ulong OneMiB = 1 << 20;
    private const int Page = 4096;
    private readonly string _swap = Path.Combine(Path.GetTempPath(), $"actorvmm-pagerjobs-{Guid.NewGuid():N}");

    public void Dispose()
    {
        if (File.Exists(_swap)) File.Delete(_swap);
    }

    private static byte[] Filled(byte value, int length = Page) => Enumerable.Repeat(value, length).ToArray();

    [Fact]
    public void Host_reads_a_swapped_page_from_the_swap_store_without_bringing_it_back_and_a_write_brings_it_back_dirty()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        using var pager = new GuestPager(map, VmspaceOptions.Paged(_swap));
        var gpa = new GuestPhysAddr(0x5000);
        Assert.True(pager.Ram.TryPage(gpa, out var page));
        Assert.True(pager.Host.TryWrite(gpa, Filled(0x5A)));
        Assert.Equal(1, pager.Reclaimer.SwapOut(page, 1));
        Assert.True(pager.Pmap.IsSwapped(page));

        var read = new byte[Page + 16]; // crosses into the next page, a hole: zeros
        Assert.True(pager.Host.TryRead(gpa, read));
        Assert.Equal(Filled(0x5A).Concat(new byte[16]), read);
        Assert.True(pager.Pmap.IsSwapped(page));
        Assert.False(pager.Pmap.IsValid(page + 1)); // the read allocated nothing

        Assert.True(pager.Host.TryWrite(gpa + 8, [1]));
        Assert.True(pager.Pmap.IsValid(page));
        Assert.True(pager.Pmap.IsModified(page));
        Assert.Equal(1, pager.SwapIns);
        Assert.True(pager.Host.TryRead(gpa, read.AsSpan(0, 9)));
        Assert.Equal([0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 1], read[..9]);
        Assert.False(pager.Host.TryRead(new GuestPhysAddr(OneMiB * 4096), new byte[1])); // not guest memory
    }

    [Fact]
    public void Holds_nest_pin_pages_against_swap_out_and_bring_swapped_pages_back()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        using var pager = new GuestPager(map, VmspaceOptions.Paged(_swap));
        Assert.True(pager.Host.TryWrite(new GuestPhysAddr(0x3000), Filled(7, 2 * Page))); // pages 3, 4
        Assert.Equal(1, pager.Reclaimer.SwapOut(4, 1));

        pager.Holds.Hold(3, 2);
        pager.Holds.Hold(3, 1);
        Assert.Equal(2UL, pager.Holds.HeldPages);
        Assert.True(pager.Pmap.IsValid(4)); // swapped in for the holder
        Assert.True(pager.Pmap.IsHeld(3) && pager.Pmap.IsHeld(4));
        Assert.Equal(0, pager.Reclaimer.SwapOut(3, 2));

        pager.Holds.Release(3, 2);
        Assert.True(pager.Pmap.IsHeld(3));  // its second hold remains
        Assert.False(pager.Pmap.IsHeld(4));
        Assert.Equal(1, pager.Reclaimer.SwapOut(3, 2));
        Assert.True(pager.Pmap.IsSwapped(4));
        var back = new byte[Page];
        Assert.True(pager.Host.TryRead(new GuestPhysAddr(0x4000), back));
        Assert.Equal(Filled(7), back);
    }

    [Fact]
    public void Reclaim_swaps_out_pages_cold_for_the_clock_down_to_seven_eighths_of_the_limit_and_never_a_held_one()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        // A limit of 16 pages (target 14), one sweep without a touch makes a page cold.
        using var pager = new GuestPager(map, VmspaceOptions.Paged(_swap, residentLimitBytes: 16 * Page, coldScans: 1));
        Assert.Equal(16UL, pager.Reclaimer.ResidentLimitPages);
        Assert.Equal(14UL, pager.Reclaimer.ReclaimTargetPages);
        Assert.True(pager.Host.TryWrite(new GuestPhysAddr(0), Filled(1, 20 * Page)));
        pager.Holds.Hold(0, 1);
        Assert.Equal(20UL, pager.Pmap.ResidentPages);

        var swapped = pager.Reclaimer.Reclaim();
        Assert.Equal(6, swapped);
        Assert.Equal(14UL, pager.Pmap.ResidentPages);
        Assert.Equal(1, pager.Reclaimer.Reclaims);
        Assert.True(pager.Pmap.IsValid(0)); // held
        Assert.Equal(0, pager.Reclaimer.Reclaim()); // at the target: nothing to do
    }
}
