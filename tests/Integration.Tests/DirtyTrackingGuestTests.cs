using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using ActorVmm.Vcpu;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// The vmspace's dirty tracking on real guests, with each source: userfaultfd write-protect, KVM's
/// dirty log and KVM's dirty rings (harvested by the vcpu actors at the EPT barrier). The same guest
/// writes the same pages; every source must report the same dirty set, round after round.
/// </summary>
public sealed class DirtyTrackingGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Region = 0x40_0000;   // 4 MiB: nothing the loader wrote, no page tables
    private const ulong RegionPages = 128;
    private const ulong Mailbox = 0x20_0000;  // guest → host: round 1 done; host → guest (+8): go on
    private const ulong Page = 4096;

    private static readonly int[] WrittenFirst = [0, 1, 5, 9, 33];
    private static readonly int[] ReadFirst = [2, 40];
    private static readonly int[] WrittenSecond = [1, 3, 33, 64, 100];
    private static readonly int[] ReadSecond = [0, 5];

    /// <summary>Round 1 (writes, reads), tells the host and waits for it; round 2; debug-exit status 1.</summary>
    private static LongModeImage TwoRoundGuest()
    {
        var a = new Assembler(64);
        void Round(int[] written, int[] read)
        {
            foreach (var p in written)
            {
                a.mov(rdi, Region + (ulong)p * Page);
                a.mov(__byte_ptr[rdi + 8], (byte)p);
            }
            foreach (var p in read)
            {
                a.mov(rdi, Region + (ulong)p * Page);
                a.mov(al, __byte_ptr[rdi]);
            }
        }
        Round(WrittenFirst, ReadFirst);
        a.mov(rdi, Mailbox);
        a.mov(__qword_ptr[rdi], 1);
        var wait = a.CreateLabel();
        a.Label(ref wait);
        a.pause();
        a.cmp(__qword_ptr[rdi + 8], 0);
        a.je(wait);
        Round(WrittenSecond, ReadSecond);
        a.mov(al, 0);
        a.@out(0xF4, al);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    public static TheoryData<string, bool> Sources => new()
    {
        { "uffd-wp", true },
        { "dirty-log", false },
        { "dirty-ring", false },
        { "dirty-ring", true },
    };

    private static async Task<int[]> DirtyPages(GuestRun run, long id)
    {
        var reply = await run.AskChild<object>("vmspace", new ScanAccessedDirty(id, Region, RegionPages * Page));
        var ad = Assert.IsType<AccessedDirty>(reply);
        return [.. Enumerable.Range(0, (int)RegionPages).Where(i => (ad.Pages[i] & PageAD.Dirty) != 0)];
    }

    /// <summary>
    /// The pages reported dirty: every page written, and nothing the guest did not touch. Our own
    /// tracker (uffd-wp) reports exactly the pages written, and so does KVM's log or ring on kvm_pvm;
    /// kvm_amd in CI's KVM box also reports pages the guest only read (seen: it logs a page when it
    /// maps it writable, which it may do on a read). A tracker may over-report; it must never miss a write.
    /// </summary>
    private static void AssertDirty(DirtyTracking tracking, int[] written, int[] read, int[] reported)
    {
        if (tracking == DirtyTracking.UffdWp)
        {
            Assert.Equal(written, reported);
            return;
        }
        var missed = written.Except(reported).ToArray();
        Assert.True(missed.Length == 0, $"written pages not reported dirty: {string.Join(", ", missed)} (reported {string.Join(", ", reported)})");
        var untouched = reported.Except(written).Except(read).ToArray();
        Assert.True(untouched.Length == 0, $"pages reported dirty that the guest never touched: {string.Join(", ", untouched)}");
    }

    [KvmTheory]
    [MemberData(nameof(Sources))]
    public async Task Every_dirty_tracking_source_reports_the_pages_the_guest_wrote(string source, bool paging)
    {
        Assert.True(DirtyTrackingNames.TryParse(source, out var tracking));
        var options = (paging ? VmspaceOptions.Paged() : VmspaceOptions.Unpaged) with { DirtyTracking = tracking };
        await using var run = await GuestRun.StartAsync(new VmSpec("guest", 16 << 20, 1, TwoRoundGuest(), Paging: options));

        // Round 1 is done when the guest says so (a deadline only so that a broken guest cannot hang the test).
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Mailbox)) != 1)
        {
            Assert.False(run.Vm.Ended.IsCompleted, $"the guest ended before round 1 was done: {(run.Vm.Ended.IsCompleted ? run.Vm.Ended.Result : null)}");
            Assert.True(DateTime.UtcNow < deadline, "the guest did not finish round 1");
            await Task.Delay(10);
        }
        AssertDirty(tracking, WrittenFirst, ReadFirst, await DirtyPages(run, 1));

        // Clear all but the region's first page (a range KVM's log clears only 64-page aligned: the
        // vmspace must clear exactly these pages), while the vcpu spins in the guest.
        Assert.IsType<DirtyCleared>(await run.AskChild<object>("vmspace", new ClearDirty(2, Region + Page, (RegionPages - 1) * Page)));
        Assert.Equal(new[] { 0 }, await DirtyPages(run, 3));

        Assert.IsType<MemoryWritten>(await run.AskChild<object>("vmspace", new WriteMemory(4, Mailbox + 8, BitConverter.GetBytes(1UL))));
        var outcome = await run.EndAsync(TimeSpan.FromSeconds(60));
        Assert.True(outcome.ExitCode == 1, outcome.ToString());
        AssertDirty(tracking, [.. WrittenSecond.Append(0).Order()], ReadSecond, await DirtyPages(run, 5));

        var stats = await run.AskChild<Stats>("vmspace", GetStats.Instance);
        Assert.Equal(source, stats.Dirty.Tracking);
        if (tracking == DirtyTracking.DirtyRing)
            Assert.True(stats.Dirty.BarrierHarvests >= 2, $"the vcpu harvested its ring {stats.Dirty.BarrierHarvests} times at the barrier");
    }

    /// <summary>Writes <paramref name="pages"/> fresh pages from <see cref="Region"/>; with
    /// <paramref name="exitEvery"/>, an OUT to an unassigned port after every that many pages.</summary>
    private static LongModeImage PageWriter(int pages, int exitEvery)
    {
        var a = new Assembler(64);
        var loop = a.CreateLabel();
        var noExit = a.CreateLabel();
        a.mov(rdi, Region);
        a.mov(ecx, pages);
        a.Label(ref loop);
        a.mov(__qword_ptr[rdi], rdi);
        a.add(rdi, (int)Page);
        if (exitEvery > 0)
        {
            a.test(ecx, exitEvery - 1);
            a.jnz(noExit);
            a.@out(0x80, al);          // unassigned: the vcpu drops the write and re-enters
            a.Label(ref noExit);
        }
        a.dec(ecx);
        a.jnz(loop);
        a.mov(al, 0);
        a.@out(0xF4, al);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    private static async Task<(PageAD[] Pages, DirtyStats Dirty, GuestRun Run)> RunPageWriter(int pages, int exitEvery)
    {
        var options = VmspaceOptions.Unpaged with { DirtyTracking = DirtyTracking.DirtyRing, DirtyRingEntries = DirtyRing.MinEntries };
        var run = await GuestRun.StartAsync(new VmSpec("guest", 16 << 20, 1, PageWriter(pages, exitEvery), Paging: options));
        var outcome = await run.EndAsync(TimeSpan.FromSeconds(60));
        Assert.True(outcome.ExitCode == 1, outcome.ToString());
        var ad = Assert.IsType<AccessedDirty>(await run.AskChild<object>("vmspace", new ScanAccessedDirty(1, 0, 16 << 20)));
        var stats = await run.AskChild<Stats>("vmspace", GetStats.Instance);
        return (ad.Pages, stats.Dirty, run);
    }

    [KvmFact]
    public async Task A_vcpu_whose_ring_fills_harvests_it_and_runs_on_and_no_page_is_lost()
    {
        const int pages = 300; // a 256-entry ring is full (but for KVM's reserve) long before
        var (ad, dirty, run) = await RunPageWriter(pages, exitEvery: 16);
        await using var _ = run;

        var first = (int)(Region / Page);
        Assert.All(ad[first..(first + pages)], p => Assert.Equal(PageAD.Dirty, p & PageAD.Dirty));
        Assert.Equal(PageAD.None, ad[first + pages] & PageAD.Dirty);
        Assert.True(dirty.RingFullHarvests >= 1, $"no ring-full harvest reached the vmspace: {dirty}");
        Assert.Equal(0, dirty.RingOverflows); // KVM's reserve took the writes between two entries
        var vcpu = await run.AskChild<VcpuProtocol.Stats>("vcpu-0", VcpuProtocol.GetStats.Instance);
        Assert.True(vcpu.Reasons.Single(r => r.Reason == "dirty-ring-full").Count >= 1);
        Assert.Equal(Region + 299 * Page, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Region + 299 * Page)));
    }

    /// <summary>
    /// KVM checks for a full ring only when it enters the guest; kvm_pvm runs this loop emulated
    /// without re-entering, so the ring fills and KVM loses later writes (a WARN in the host log).
    /// The vmspace must not lose them silently: a harvest that finds the ring full makes every RAM
    /// page dirty. On a host that exits in time, the ring-full path reports them instead.
    /// </summary>
    [KvmFact]
    public async Task A_ring_that_overflows_without_an_exit_loses_no_dirty_page()
    {
        const int pages = 300;
        var (ad, dirty, run) = await RunPageWriter(pages, exitEvery: 0);
        await using var _ = run;

        var first = (int)(Region / Page);
        Assert.All(ad[first..(first + pages)], p => Assert.Equal(PageAD.Dirty, p & PageAD.Dirty));
        if (dirty.RingOverflows > 0)
            Assert.All(ad, p => Assert.Equal(PageAD.Dirty, p & PageAD.Dirty));
        else
            Assert.True(dirty.RingFullHarvests >= 1, $"300 pages in a 256-entry ring, neither full nor overflowed: {dirty}");
    }

    public static TheoryData<bool> Paging => new() { false, true };

    /// <summary>
    /// Write logs (<see cref="TrackWrites"/>): after a whole save, a written-only save lists the pages
    /// the guest wrote (KVM's log, turned on while the VM runs) and the pages the host wrote (the
    /// vmspace's writes, which KVM does not see), and brings exactly those into the file, which then
    /// holds guest memory as it is. Two logs on at once each see the writes since their own last save.
    /// </summary>
    [KvmTheory]
    [MemberData(nameof(Paging))]
    public async Task Write_logs_see_the_guests_and_the_hosts_writes_and_a_written_only_save_copies_them(bool paging)
    {
        var migration = Path.Combine(Path.GetTempPath(), $"actorvmm-writelog-{Guid.NewGuid():N}");
        var checkpoint = migration + "-checkpoint";
        const ulong HostOnly = 0x30_0000; // written by the host before the second log starts
        try
        {
            await using var run = await GuestRun.StartAsync(new VmSpec("guest", 16 << 20, 1, TwoRoundGuest(), Paging: paging ? VmspaceOptions.Paged() : null));
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
            while (run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Mailbox)) != 1)
            {
                Assert.False(run.Vm.Ended.IsCompleted, "the guest ended before round 1 was done");
                Assert.True(DateTime.UtcNow < deadline, "the guest did not finish round 1");
                await Task.Delay(10);
            }
            async Task<MemorySaved> Save(long id, string file, string log, bool writtenOnly)
            {
                var saved = Assert.IsType<MemorySaved>(await run.AskChild<object>("vmspace", new SaveMemory(id, file) { Log = log, WrittenOnly = writtenOnly }));
                Assert.Null(saved.Error);
                return saved;
            }
            // The migration's log from here, a whole save first (round 1's writes are in it); a host write;
            // then the checkpoints' log, with a whole save of its own.
            Assert.Null(Assert.IsType<WritesTracked>(await run.AskChild<object>("vmspace", new TrackWrites(1, true, WriteLogs.Migration))).Error);
            await Save(2, migration, WriteLogs.Migration, writtenOnly: false);
            Assert.IsType<MemoryWritten>(await run.AskChild<object>("vmspace", new WriteMemory(3, HostOnly, [1, 2, 3])));
            Assert.Null(Assert.IsType<WritesTracked>(await run.AskChild<object>("vmspace", new TrackWrites(4, true, WriteLogs.Checkpoint))).Error);
            await Save(5, checkpoint, WriteLogs.Checkpoint, writtenOnly: false);

            Assert.IsType<MemoryWritten>(await run.AskChild<object>("vmspace", new WriteMemory(6, Mailbox + 8, BitConverter.GetBytes(1UL))));
            var outcome = await run.EndAsync(TimeSpan.FromSeconds(60));
            Assert.True(outcome.ExitCode == 1, outcome.ToString());

            void AssertWritten(ulong[] written, bool hostOnly)
            {
                Assert.Equal(written.Order(), written);
                Assert.Contains(Mailbox / Page, written); // the host's write (RAM starts at 0: RAM page = GPA / 4 KiB)
                Assert.Equal(hostOnly, written.Contains(HostOnly / Page));
                int[] region = [.. written.Where(p => p >= Region / Page && p < Region / Page + RegionPages).Select(p => (int)(p - Region / Page))];
                AssertDirty(DirtyTracking.DirtyLog, WrittenSecond, ReadSecond, region);
            }
            AssertWritten((await Save(7, migration, WriteLogs.Migration, writtenOnly: true)).Written!, hostOnly: true);
            AssertWritten((await Save(8, checkpoint, WriteLogs.Checkpoint, writtenOnly: true)).Written!, hostOnly: false);

            // Each file now holds guest memory as it is, the pages of both rounds among them.
            var inFile = new byte[Page];
            var inGuest = new byte[Page];
            foreach (var file in new[] { migration, checkpoint })
            {
                using var handle = File.OpenHandle(file);
                foreach (var page in WrittenFirst.Concat(WrittenSecond).Select(p => Region + (ulong)p * Page).Append(Mailbox).Append(HostOnly))
                {
                    RandomAccess.Read(handle, inFile, (long)page);
                    Assert.True(run.Vm.Memory.TryRead(new GuestPhysAddr(page), inGuest));
                    Assert.True(inGuest.AsSpan().SequenceEqual(inFile), $"page 0x{page:X} of {Path.GetFileName(file)} is not the guest's");
                }
            }
            // Nothing written since: a log taken again is empty; a log turned off has nothing to give.
            Assert.Empty((await Save(9, checkpoint, WriteLogs.Checkpoint, writtenOnly: true)).Written!);
            Assert.Null(Assert.IsType<WritesTracked>(await run.AskChild<object>("vmspace", new TrackWrites(10, false, WriteLogs.Migration))).Error);
            var stale = Assert.IsType<MemorySaved>(await run.AskChild<object>("vmspace", new SaveMemory(11, migration) { Log = WriteLogs.Migration, WrittenOnly = true }));
            Assert.Contains("not tracked", stale.Error);
            Assert.Null(Assert.IsType<WritesTracked>(await run.AskChild<object>("vmspace", new TrackWrites(12, false, WriteLogs.Checkpoint))).Error);
        }
        finally
        {
            File.Delete(migration);
            File.Delete(checkpoint);
        }
    }

    [KvmFact]
    public async Task A_vm_whose_dirty_tracking_uses_kvms_log_cannot_track_writes_for_a_migration()
    {
        await using var run = await GuestRun.StartAsync(new VmSpec("guest", 16 << 20, 1, TwoRoundGuest(),
            Paging: VmspaceOptions.Unpaged with { DirtyTracking = DirtyTracking.DirtyLog }));
        var refused = Assert.IsType<WritesTracked>(await run.AskChild<object>("vmspace", new TrackWrites(1, true)));
        Assert.Contains("already uses KVM's dirty log", refused.Error);
    }
}
