using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// A device's page flush (pc-testdev's port 0xE4) at the vmspace, over real memfd memory: the guest
/// view's mapping of the page goes (what makes KVM's MMU notifier zap the page), its contents stay,
/// the flush is counted, and the answer comes when it is done. A host thread touching the guest view
/// stands in for the vcpu: with userfaultfd its next touch is a MINOR fault; without, the kernel's
/// page table (/proc/self/pagemap) shows the page unmapped until touched again.
/// </summary>
public sealed class PageFlushTests : TestKit
{
    private const ulong Page = 4096;
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    private async Task Flush(PagedVmspace vm, ulong gpa, long id)
    {
        vm.Vmspace.Tell(new DeviceProtocol.FlushGuestPage("pc-testdev", id, gpa), TestActor);
        Assert.Equal(new DeviceProtocol.Completed(id), await ExpectMsgAsync<DeviceProtocol.Completed>(Wait));
    }

    /// <summary>Whether the calling process maps <paramref name="address"/> now (pagemap bit 63, "present").</summary>
    private static bool Mapped(nint address)
    {
        using var pagemap = File.OpenHandle("/proc/self/pagemap");
        var entry = new byte[8];
        RandomAccess.Read(pagemap, entry, (long)((ulong)address / Page * 8));
        return (BitConverter.ToUInt64(entry) & (1UL << 63)) != 0;
    }

    [Fact]
    public async Task A_flushed_page_keeps_its_contents_and_its_next_guest_touch_is_a_minor_fault()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20);
        const ulong p = 0x3000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p + 8), [0xC0, 0xDE]));
        await vm.Guest(() => GuestAccess.ReadByte(vm.Gva(p))); // mapped: no fault now
        var before = await vm.Stats();

        await Flush(vm, p + 0x123, id: 1);

        byte[] seen = [];
        await vm.Guest(() => seen = GuestAccess.Read(vm.Gva(p + 8), 2));
        var after = await vm.Stats();
        Assert.Equal([0xC0, 0xDE], seen);
        Assert.Equal(1, after.FlushedPages);
        Assert.Equal(before.Paging.MinorFaults + 1, after.Paging.MinorFaults);
        Assert.Equal(before.Paging.MissingFaults, after.Paging.MissingFaults);
    }

    [Fact]
    public async Task Without_userfaultfd_a_flush_unmaps_the_page_from_the_guest_view_only()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20, userfaultfd: false);
        const ulong p = 0x5000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p), [1, 2, 3]));
        Assert.True(Mapped(vm.Gva(p)));

        await Flush(vm, p, id: 7);

        Assert.False(Mapped(vm.Gva(p)), "the guest view still maps the flushed page");
        Assert.Equal([1, 2, 3], vm.Ram.HostSpan(p, 3).ToArray()); // the memfd kept it
        byte[] seen = [];
        await vm.Guest(() => seen = GuestAccess.Read(vm.Gva(p), 3));
        Assert.Equal([1, 2, 3], seen);
        Assert.True(Mapped(vm.Gva(p)));
        Assert.Equal(1, (await vm.Stats()).FlushedPages);
    }

    [Fact]
    public async Task A_flush_outside_guest_ram_is_answered_and_not_counted()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20, userfaultfd: false);

        await Flush(vm, 0xFF00_0000, id: 3);
        await Flush(vm, 1 << 20, id: 4); // the first byte past RAM

        Assert.Equal(0, (await vm.Stats()).FlushedPages);
    }
}
