using ActorVmm.Memory;
using static ActorVmm.Memory.PageSample;

namespace ActorVmm.Actors.Memory.Tests;

public class PageAgingTests
{
    [Fact]
    public void An_idle_resident_page_ages_one_per_scan_and_a_touch_a_hold_or_eviction_resets_it()
    {
        var aging = new PageAging(4, coldScans: 2);
        aging.Observe([Resident, Resident, Resident, Resident]);
        aging.Observe([Resident, Resident | Accessed, Resident | Held, None]);
        Assert.Equal([2, 0, 0, 0], Enumerable.Range(0, 4).Select(p => aging.Age((ulong)p)));
        aging.Observe([Resident, Resident, Resident, Resident]);
        Assert.Equal([3, 1, 1, 1], Enumerable.Range(0, 4).Select(p => aging.Age((ulong)p)));
    }

    [Fact]
    public void Victims_are_the_pages_idle_for_cold_scans_and_never_a_held_or_touched_one()
    {
        var aging = new PageAging(5, coldScans: 2);
        aging.Observe([Resident, Resident, Resident | Held, Resident, None]);
        Assert.Empty(aging.Victims(residentPages: 4, targetResident: 0)); // nothing idle for 2 scans yet
        aging.Observe([Resident, Resident | Accessed, Resident | Held, Resident, None]);
        Assert.Equal([0UL, 3UL], aging.Victims(residentPages: 4, targetResident: 0));
    }

    [Fact]
    public void Above_the_target_the_oldest_idle_pages_go_too_but_not_one_accessed_in_the_last_scan()
    {
        var aging = new PageAging(6, coldScans: 3);
        aging.Observe([Resident, Resident, None, None, None, None]);
        aging.Observe([Resident, Resident, Resident, Resident, Resident | Accessed, Resident | Accessed]);
        // ages 2, 2, 1, 1, 0, 0: nothing cold; 6 resident, target 3 -> the three oldest idle ones.
        Assert.Equal([0UL, 1UL, 2UL], aging.Victims(residentPages: 6, targetResident: 3));
        // Target 1 would need 5, but only four pages were idle in the last scan.
        Assert.Equal([0UL, 1UL, 2UL, 3UL], aging.Victims(residentPages: 6, targetResident: 1));
        // At or below the target, only cold pages (none here).
        Assert.Empty(aging.Victims(residentPages: 3, targetResident: 3));
    }

    [Fact]
    public void A_sample_of_the_wrong_size_or_a_cold_count_of_zero_is_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new PageAging(4, coldScans: 0));
        Assert.Throws<ArgumentException>(() => new PageAging(4, coldScans: 1).Observe([Resident]));
    }
}
