using Akka.TestKit.Xunit2;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// The pmap's record of superpage-backed guest RAM (issue 4 item 8), with real memfd memory. Whether
/// the host gives memfds huge pages is the host's setting (<see cref="ShmemHugePages"/>): each test
/// checks the vmspace against what this host allows, so on a host with shmem_enabled = never only the
/// "none, and why" half can run.
/// </summary>
public sealed class SuperpageTests : TestKit
{
    private const ulong MiB = 1 << 20;
    private const ulong Page = 4096;

    [Fact]
    public async Task An_unpaged_vmspace_records_the_runs_the_host_backs_with_huge_pages_and_says_why_when_none()
    {
        var host = ShmemHugePages.Read();
        await using var vm = await PagedVmspace.StartAsync(this, 8 * MiB, userfaultfd: false, superpages: true,
            load: map => map.Write(new GuestPhysAddr(2 * MiB), new byte[2 * MiB])); // a loader fills the second 2 MiB run
        Assert.Equal(host.Allowed, vm.Ram.HugePagesAdvised); // advised only where it can help
        // Guest touches (no userfaultfd here: plain page faults) map the run in the guest view.
        await vm.Guest(() => GuestAccess.Read(vm.Gva(2 * MiB), (int)(2 * MiB)));

        var pm = await vm.Ask<PmapEntries>(new GetPmap(1, 0, 8 * MiB));
        var s = (await vm.Stats()).Paging;
        Assert.Equal(host.Allowed, pm.Flags.Superpages);
        Assert.Contains(host.Reason, s.Superpages);
        var ps = pm.Entries.Select(e => (e & pm.Bits().Superpage) != 0).ToArray();
        Assert.Equal((ulong)ps.Count(b => b), s.SuperpagePages);
        if (host.Allowed)
        {
            Assert.StartsWith("on:", s.Superpages);
            // Only whole 2 MiB runs, and only where the guest view maps them.
            for (var run = 0; run < 4; run++)
                Assert.True(ps.Skip(run * 512).Take(512).Distinct().Count() == 1, $"run {run} is partly superpage-backed");
            Assert.All(ps.Take(512).Concat(ps.Skip(1024)), Assert.False);
        }
        else
        {
            Assert.StartsWith("off:", s.Superpages);
            Assert.Equal(0UL, s.SuperpagePages);
            Assert.All(ps, Assert.False);
        }
    }

    [Fact]
    public async Task A_vmspace_paging_through_userfaultfd_has_no_superpages_and_says_so()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 4 * MiB);
        await vm.Guest(() => GuestAccess.Write(vm.Gva(2 * MiB), new byte[2 * MiB]));
        var pm = await vm.Ask<PmapEntries>(new GetPmap(1, 2 * MiB, 2 * MiB));
        var s = (await vm.Stats()).Paging;
        Assert.False(pm.Flags.Superpages);
        Assert.All(pm.Entries, e => Assert.Equal(0UL, e & pm.Bits().Superpage));
        Assert.StartsWith("off: userfaultfd fills and maps 4 KiB pages", s.Superpages);
        Assert.Equal((512L, 0UL), (s.MissingFaults, s.SuperpagePages)); // one fault per 4 KiB page
    }

    [Fact]
    public async Task Superpages_turned_off_leave_guest_RAM_unadvised()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 4 * MiB, userfaultfd: false, superpages: false);
        Assert.False(vm.Ram.HugePagesAdvised);
        var s = (await vm.Stats()).Paging;
        Assert.StartsWith("off:", s.Superpages);
        Assert.Equal(0UL, s.SuperpagePages);
        var pm = await vm.Ask<PmapEntries>(new GetPmap(1, 0, Page));
        Assert.False(pm.Flags.Superpages);
    }
}
