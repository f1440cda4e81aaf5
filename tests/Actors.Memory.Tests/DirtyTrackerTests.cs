using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// Each <see cref="IDirtyTracker"/> alone, over a real memfd-backed map and pager (userfaultfd for
/// uffd-wp); KVM's dirty bitmap is a fake that records what the tracker asks of it.
/// </summary>
public sealed class DirtyTrackerTests
{
    private const ulong OneMiB = 1 << 20;
    private const ulong Page = 4096;

    private sealed class FakeDirtyLog : IDirtyLog
    {
        public ulong[] Bitmap = new ulong[4];
        public readonly List<(uint Slot, ulong FirstPage, uint Pages, ulong[] Bitmap)> Clears = [];
        public ulong[] GetDirtyLog(uint slot, ulong pages) => Bitmap;
        public void ClearDirtyLog(uint slot, ulong firstPage, uint pages, ulong[] bitmap) => Clears.Add((slot, firstPage, pages, bitmap));
    }

    private static PageAD[] DirtyOnly(PageAD[] pages) => pages.Select(p => p & PageAD.Dirty).ToArray();

    private static void HostWrite(GuestPager pager, ulong page) =>
        Assert.True(pager.Host.TryWrite(pager.Ram.Gpa(page), [0xAB]));

    [Fact]
    public void Create_gives_each_mode_its_tracker()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        Assert.IsType<UffdWpTracker>(DirtyTrackers.Create(DirtyTracking.UffdWp, map, null));
        Assert.IsType<DirtyLogTracker>(DirtyTrackers.Create(DirtyTracking.DirtyLog, map, new FakeDirtyLog()));
        Assert.IsType<DirtyRingTracker>(DirtyTrackers.Create(DirtyTracking.DirtyRing, map, null));
        Assert.All(Enum.GetValues<DirtyTracking>(), m => Assert.Equal(m, DirtyTrackers.Create(m, map, new FakeDirtyLog()).Mode));
    }

    [Fact]
    public void UffdWp_clear_write_protects_resident_unheld_pages_and_a_host_write_makes_one_dirty_again()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        using var pager = new GuestPager(map, VmspaceOptions.Paged());
        var tracker = DirtyTrackers.Create(DirtyTracking.UffdWp, map, null);
        Assert.True(tracker.NeedsPaging);
        Assert.False(tracker.ScanWaitsForVcpus);
        Assert.Null(tracker.CannotClear(pager));
        for (var p = 0UL; p < 3; p++) HostWrite(pager, p);
        pager.Holds.Hold(2, 1);
        Assert.Equal([PageAD.Dirty, PageAD.Dirty, PageAD.Dirty, PageAD.None], DirtyOnly(tracker.Scan(pager, 0, 4)));

        tracker.Clear(pager, 0, 4, generation: 1, vcpus: [0]);
        Assert.Equal([PageAD.None, PageAD.None, PageAD.Dirty, PageAD.None], DirtyOnly(tracker.Scan(pager, 0, 4)));
        Assert.True(pager.Pmap.IsWriteProtected(0));
        Assert.False(pager.Pmap.IsWriteProtected(2)); // held: never write-protected

        HostWrite(pager, 1);
        Assert.Equal(PageAD.Dirty, tracker.Scan(pager, 1, 1)[0] & PageAD.Dirty);
        Assert.False(tracker.Harvested(0, [0, 1], overflowed: true)); // no rings in this mode
        Assert.Equal(PageAD.None, tracker.Scan(pager, 0, 1)[0] & PageAD.Dirty);
    }

    [Fact]
    public void UffdWp_cannot_clear_without_dirty_bit_emulation()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        using var pager = new GuestPager(map, VmspaceOptions.Unpaged);
        var why = DirtyTrackers.Create(DirtyTracking.UffdWp, map, null).CannotClear(pager);
        Assert.StartsWith("no dirty-bit emulation: userfaultfd off", why);
    }

    [Fact]
    public void DirtyLog_scan_joins_kvms_bitmap_host_writes_and_holds_and_clear_skips_held_pages_in_an_aligned_range()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        using var pager = new GuestPager(map, VmspaceOptions.Unpaged);
        var log = new FakeDirtyLog();
        var tracker = DirtyTrackers.Create(DirtyTracking.DirtyLog, map, log);
        Assert.Null(tracker.Unusable);
        Assert.False(tracker.NeedsPaging);
        Assert.False(tracker.ScanWaitsForVcpus);
        log.Bitmap[0] = 0b0000_0010;   // KVM logged page 1
        tracker.HostWrote(2, 1);        // the host wrote page 2
        pager.Holds.Hold(3, 1);         // page 3 is held
        Assert.Equal([PageAD.None, PageAD.Dirty, PageAD.Dirty, PageAD.Dirty, PageAD.None], DirtyOnly(tracker.Scan(pager, 0, 5)));

        tracker.Clear(pager, 1, 4, generation: 7, vcpus: [0, 1]);
        var clear = Assert.Single(log.Clears);
        var ram = map.Segments.First(s => !s.ReadOnly);
        Assert.Equal(map.SlotOf(ram), clear.Slot);
        Assert.Equal((0UL, 64U), (clear.FirstPage, clear.Pages)); // KVM wants 64-page alignment
        Assert.Equal([0b0001_0110UL], clear.Bitmap);                // pages 1, 2, 4; not the held page 3

        log.Bitmap[0] = 0;
        Assert.Equal([PageAD.None, PageAD.None, PageAD.None, PageAD.Dirty, PageAD.None], DirtyOnly(tracker.Scan(pager, 0, 5)));
    }

    [Fact]
    public void DirtyLog_is_unusable_without_kvms_log()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        Assert.Contains("no KVM dirty log", DirtyTrackers.Create(DirtyTracking.DirtyLog, map, null).Unusable);
    }

    [Fact]
    public void DirtyRing_keeps_harvested_ram_pages_drops_those_before_a_vcpus_ack_of_a_clear_and_an_overflow_dirties_all()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        using var pager = new GuestPager(map, VmspaceOptions.Unpaged);
        var tracker = DirtyTrackers.Create(DirtyTracking.DirtyRing, map, null);
        Assert.True(tracker.ScanWaitsForVcpus);
        Assert.False(tracker.NeedsPaging);
        var ramPages = OneMiB / Page;

        Assert.False(tracker.Harvested(0, [1, 0xF_FFFF], overflowed: false)); // RAM is at gpa 0: GFN = page; the other is not RAM
        Assert.Equal([PageAD.None, PageAD.Dirty, PageAD.None], DirtyOnly(tracker.Scan(pager, 0, 3)));

        tracker.Clear(pager, 0, 3, generation: 5, vcpus: [0]);
        tracker.Harvested(0, [2], overflowed: false); // written before vcpu 0 saw the clear
        tracker.Acked(0, 5);
        tracker.Harvested(0, [0], overflowed: false); // written after
        Assert.Equal([PageAD.Dirty, PageAD.None, PageAD.None], DirtyOnly(tracker.Scan(pager, 0, 3)));

        Assert.True(tracker.Harvested(1, [], overflowed: true));
        Assert.All(tracker.Scan(pager, 0, ramPages), p => Assert.Equal(PageAD.Dirty, p & PageAD.Dirty));
    }
}
