namespace ActorVmm.Memory;

/// <summary>
/// Keeps guest RAM's residency under the resident limit and chooses what goes to the swap store:
/// the direct-reclaim clock (<see cref="Reclaim"/>), and the swapper's side (<see
/// cref="SampleAccessed"/>, <see cref="PageOut"/>; the aging itself is <see cref="PageAging"/>, in
/// the swapper actor). Held pages are never chosen.
/// </summary>
internal sealed class ClockReclaimer
{
    private readonly GuestPager _pager;
    private readonly int _coldScans;
    // Per page: sweeps of the clock hand that found it resident with A clear.
    private readonly byte[] _age;
    // Touched by the guest since the swapper's last sample (a fault mapped it): A alone would miss
    // a touch whose A bit the clock cleared again before the sample.
    private readonly bool[] _referenced;
    private ulong _clockHand;

    /// <summary>Direct reclaims that ran (residency was above the limit).</summary>
    public long Reclaims;

    /// <param name="pager">the pager whose resident pages the clock sweeps</param>
    /// <param name="residentLimitPages">0 = no limit.</param>
    /// <param name="coldScans">Sweeps without a touch before a page is swapped out (clamped to 1..255).</param>
    public ClockReclaimer(GuestPager pager, ulong residentLimitPages, int coldScans)
    {
        _pager = pager;
        ResidentLimitPages = residentLimitPages;
        _coldScans = Math.Clamp(coldScans, 1, 255);
        _age = new byte[pager.Ram.Total];
        _referenced = new bool[pager.Ram.Total];
    }

    private Pmap Pmap => _pager.Pmap;
    private ulong Total => _pager.Ram.Total;

    /// <summary>The resident limit in pages (0 = none).</summary>
    public ulong ResidentLimitPages { get; }

    /// <summary>Resident pages reclaim frees down to: 7/8 of the limit, so it runs in batches (0 = no limit).</summary>
    public ulong ReclaimTargetPages => ResidentLimitPages == 0 ? 0 : ResidentLimitPages - Math.Max(1, ResidentLimitPages / 8);

    /// <summary>A fault mapped the page in the guest view: it is young, and referenced for the swapper.</summary>
    public void Touched(ulong page)
    {
        _age[page] = 0;
        _referenced[page] = true;
    }

    /// <summary>The page went to the swap store: it comes back young.</summary>
    public void Forget(ulong page) => _age[page] = 0;

    /// <summary>
    /// Direct reclaim, the clock: while resident pages (plus <paramref name="reserve"/> about to
    /// become resident) exceed the limit, sweep the hand over guest RAM; a resident, unheld page
    /// with A set gets A cleared (its guest mapping dropped) and its age reset; one with A clear
    /// ages, and after <c>ColdScans</c> sweeps without a touch it is swapped out. Frees down to
    /// <see cref="ReclaimTargetPages"/>. Returns the pages swapped out. (The swapper actor ages pages
    /// periodically instead, so that this rarely has to run.)
    /// </summary>
    public int Reclaim(ulong reserve = 0)
    {
        if (ResidentLimitPages == 0 || Pmap.ResidentPages + reserve <= ResidentLimitPages) return 0;
        Reclaims++;
        var need = Pmap.ResidentPages + reserve - ReclaimTargetPages;
        var victims = new HashSet<ulong>(); // the hand may lap within one call: choose a page once
        var cleared = new List<ulong>();
        for (var scanned = 0UL; (ulong)victims.Count < need && scanned < Total * (ulong)(_coldScans + 1); scanned++)
        {
            var p = _clockHand;
            _clockHand = (p + 1) % Total;
            if (!Pmap.IsValid(p) || Pmap.IsHeld(p) || victims.Contains(p)) continue;
            if (_pager.TracksAccessed && Pmap.IsAccessed(p))
            {
                Pmap.SetAccessed(p, false);
                _age[p] = 0;
                cleared.Add(p);
            }
            else if (++_age[p] >= _coldScans)
            {
                victims.Add(p);
            }
        }
        cleared.Sort();
        _pager.DropGuestMappings(cleared);
        var sorted = victims.Order().ToList();
        _pager.SwapOut(sorted);
        return sorted.Count;
    }

    /// <summary>
    /// One A-bit scan for the swapper: per page, resident / accessed since the last scan (A set, or
    /// a fault mapped it) / held; then A is cleared on every resident, unheld page that had it (its
    /// guest mapping dropped: the next touch is a MINOR fault) and the scan starts over. Without
    /// accessed-bit emulation A cannot be cleared, so every resident page reads as accessed.
    /// Returns whether any mapping was dropped (running vcpus must then see the change).
    /// </summary>
    public PageSample[] SampleAccessed(out bool cleared)
    {
        var sample = new PageSample[Total];
        var clear = new List<ulong>();
        for (var p = 0UL; p < Total; p++)
        {
            if (!Pmap.IsValid(p))
            {
                _referenced[p] = false;
                continue;
            }
            var s = PageSample.Resident;
            var accessed = Pmap.IsAccessed(p);
            if (accessed || _referenced[p]) s |= PageSample.Accessed;
            if (Pmap.IsHeld(p)) s |= PageSample.Held;
            else if (accessed && _pager.TracksAccessed) clear.Add(p);
            _referenced[p] = false;
            sample[p] = s;
        }
        _pager.DropGuestMappings(clear);
        foreach (var p in clear) Pmap.SetAccessed(p, false);
        cleared = clear.Count > 0;
        return sample;
    }

    /// <summary>
    /// Swaps out those of <paramref name="pages"/> (the swapper's victims) that are still resident,
    /// unheld and untouched since the last <see cref="SampleAccessed"/>; a page the guest touched in
    /// the meantime stays. Returns how many went.
    /// </summary>
    public int PageOut(IEnumerable<ulong> pages)
    {
        if (!_pager.CanSwap) throw new VmspaceException("paging out needs userfaultfd and a swap file");
        var victims = new List<ulong>();
        foreach (var p in pages.Where(p => p < Total).Distinct().Order())
            if (Pmap.IsValid(p) && !Pmap.IsHeld(p) && !Pmap.IsAccessed(p) && !_referenced[p]) victims.Add(p);
        _pager.SwapOut(victims);
        return victims.Count;
    }

    /// <summary>Swaps out the resident, unheld pages among [first, first+count); returns how many.</summary>
    public int SwapOut(ulong first, ulong count)
    {
        var victims = new List<ulong>();
        for (var p = first; p < first + count; p++)
            if (Pmap.IsValid(p) && !Pmap.IsHeld(p)) victims.Add(p);
        _pager.SwapOut(victims);
        return victims.Count;
    }
}
