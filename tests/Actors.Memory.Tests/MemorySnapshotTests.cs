using Akka.TestKit.Xunit2;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// SaveMemory and MemoryRestore with real memfds, a real userfaultfd and real files: a vmspace's
/// guest memory is saved to a sparse file and brought back into a new vmspace, lazily (first touches
/// are MISSING faults filled from the file) or eagerly. Host threads touching the guest view stand
/// in for vcpus.
/// </summary>
public sealed class MemorySnapshotTests : TestKit, IDisposable
{
    private const ulong Page = 4096;
    private const ulong OneMiB = 1 << 20;
    private const ulong A = 0x10000, B = 0x20000, C = 0x30000, Hole = 0x40000;
    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-memsnap-").FullName;

    void IDisposable.Dispose()
    {
        Directory.Delete(_dir, recursive: true);
        base.Dispose();
    }

    private string FilePath(string name) => Path.Combine(_dir, name);

    private static byte[] Pattern(byte seed) => Enumerable.Range(0, (int)Page).Select(i => (byte)(seed + i * 7)).ToArray();

    /// <summary>A guest that wrote pages A, B, C (B then swapped out), saved with its A/D state.
    /// Before the save, D of A is cleared: A is saved clean.</summary>
    private async Task<MemorySaved> SaveBusyGuest(string path, string? adPath, byte[]? firmware = null)
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, firmware: firmware);
        await vm.Guest(() =>
        {
            GuestAccess.Write(vm.Gva(A), Pattern(1));
            GuestAccess.Write(vm.Gva(B), Pattern(2));
            GuestAccess.Write(vm.Gva(C), Pattern(3));
        });
        Assert.Equal(1, (await vm.Ask<SwappedOut>(new SwapOut(1, B, Page))).Pages);
        await vm.Ask<DirtyCleared>(new ClearDirty(2, A, Page));
        Assert.Equal(1UL, (await vm.Stats()).Paging.SwappedPages);
        var saved = await vm.Ask<MemorySaved>(new SaveMemory(3, path, adPath));
        Assert.Null(saved.Error);
        return saved;
    }

    private static List<(ulong, ulong)> Extents(string path)
    {
        using var f = File.OpenHandle(path);
        return SparseFiles.DataRanges(f, 0, (ulong)RandomAccess.GetLength(f));
    }

    [Fact]
    public async Task SaveMemory_must_write_resident_and_swapped_pages_at_their_offsets_and_leave_holes_elsewhere()
    {
        var path = FilePath("mem");
        var adPath = FilePath("mem.ad");
        var saved = await SaveBusyGuest(path, adPath);

        Assert.Equal((3L, (long)OneMiB, adPath), (saved.Pages, saved.Bytes, saved.AccessedDirtyPath));
        var bytes = File.ReadAllBytes(path);
        Assert.Equal((int)OneMiB, bytes.Length);
        Assert.Equal(Pattern(1), bytes[(int)A..(int)(A + Page)]);
        Assert.Equal(Pattern(2), bytes[(int)B..(int)(B + Page)]); // from the swap file
        Assert.Equal(Pattern(3), bytes[(int)C..(int)(C + Page)]);
        Assert.Equal([(A, Page), (B, Page), (C, Page)], Extents(path));
        Assert.False(File.Exists(path + ".tmp"));

        var ad = MemoryImage.ReadAccessedDirty(adPath, OneMiB / Page);
        Assert.Equal(PageAD.Accessed, ad[A / Page]);                   // D cleared before the save
        Assert.Equal(PageAD.Dirty, ad[B / Page] & PageAD.Dirty);        // swapped, dirty
        Assert.Equal(PageAD.Accessed | PageAD.Dirty, ad[C / Page]);
        Assert.Equal(PageAD.None, ad[Hole / Page]);
    }

    [Fact]
    public async Task Lazy_restore_must_fill_first_touches_from_the_file_and_count_them()
    {
        var path = FilePath("mem");
        var adPath = FilePath("mem.ad");
        await SaveBusyGuest(path, adPath);

        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, restore: new MemoryRestore(path, Lazy: true, adPath));
        var st = await vm.Stats();
        Assert.Equal(new RestoreStats("lazy", 3, 0, 3), st.Restore);
        Assert.Equal(0UL, vm.Ram.AllocatedBytes);

        byte[] a = [], hole = [];
        await vm.Guest(() =>
        {
            a = GuestAccess.ReadPage(vm.Gva(A));
            hole = GuestAccess.ReadPage(vm.Gva(Hole));
        });
        Assert.Equal(Pattern(1), a);
        Assert.All(hole, b => Assert.Equal(0, b));
        st = await vm.Stats();
        Assert.Equal(new RestoreStats("lazy", 3, 1, 2), st.Restore);
        Assert.Equal((2L, 1L, 2UL), (st.Paging.MissingFaults, st.Paging.ZeroFills, st.Paging.ResidentPages));

        // A was saved clean: restored write-protected, so the guest's write is a WP fault.
        await vm.Guest(() => GuestAccess.Write(vm.Gva(A), [0xEE]));
        st = await vm.Stats();
        Assert.Equal(1L, st.Paging.WriteProtectFaults);

        // A host read of a page still in the file reads it there and leaves it there.
        var b = await vm.Ask<MemoryData>(new ReadMemory(4, B, (int)Page));
        Assert.Equal(Pattern(2), b.Data);
        Assert.Equal(1L, (await vm.Stats()).Restore.RestoredPages);

        // A host write of part of a page still in the file keeps the rest of its contents.
        await vm.Ask<MemoryWritten>(new WriteMemory(5, C + 8, [0xAB, 0xCD]));
        Assert.Equal(new RestoreStats("lazy", 3, 2, 1), (await vm.Stats()).Restore);
        byte[] c = [];
        await vm.Guest(() => c = GuestAccess.ReadPage(vm.Gva(C)));
        var expected = Pattern(3);
        expected[8] = 0xAB;
        expected[9] = 0xCD;
        Assert.Equal(expected, c);
    }

    [Fact]
    public async Task Lazy_restore_without_paging_must_use_missing_faults_until_every_page_is_in_then_close_userfaultfd()
    {
        var path = FilePath("mem");
        await SaveBusyGuest(path, null);

        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, userfaultfd: false, restore: new MemoryRestore(path));
        var st = await vm.Stats();
        Assert.Equal(new RestoreStats("lazy-restore-only", 3, 0, 3), st.Restore);
        Assert.True(st.Paging.Enabled, st.Paging.Features);
        Assert.Contains("Missing", st.Paging.Features);
        Assert.DoesNotContain("Minor", st.Paging.Features);

        var seen = new List<byte[]>();
        await vm.Guest(() =>
        {
            seen.Add(GuestAccess.ReadPage(vm.Gva(A)));
            seen.Add(GuestAccess.ReadPage(vm.Gva(Hole)));
            seen.Add(GuestAccess.ReadPage(vm.Gva(B)));
        });
        Assert.Equal([Pattern(1), new byte[Page], Pattern(2)], seen);
        st = await vm.Stats();
        Assert.Equal(new RestoreStats("lazy-restore-only", 3, 2, 1), st.Restore);
        Assert.Equal(3L, st.Paging.MissingFaults);

        byte[] c = [];
        await vm.Guest(() => c = GuestAccess.ReadPage(vm.Gva(C)));
        Assert.Equal(Pattern(3), c);
        st = await vm.Stats();
        Assert.Equal(new RestoreStats("lazy-complete", 3, 3, 0), st.Restore);
        Assert.False(st.Paging.Enabled, st.Paging.Features); // userfaultfd closed: an unpaged vmspace
        Assert.Equal(4L, st.Paging.MissingFaults);

        // The kernel now serves fresh pages itself: no fault reaches the vmspace.
        await vm.Guest(() => GuestAccess.Write(vm.Gva(Hole + Page), [1]));
        Assert.Equal(4L, (await vm.Stats()).Paging.MissingFaults);
        Assert.Equal([1], (await vm.Ask<MemoryData>(new ReadMemory(1, Hole + Page, 1))).Data);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Eager_restore_must_copy_only_the_data_extents_before_ready(bool paging)
    {
        var path = FilePath("mem");
        await SaveBusyGuest(path, null);

        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, userfaultfd: paging, restore: new MemoryRestore(path, Lazy: false));
        Assert.Equal(3 * Page, vm.Ram.AllocatedBytes);
        Assert.Equal(Pattern(1), vm.Ram.HostSpan(A, (int)Page).ToArray());
        Assert.Equal(Pattern(2), vm.Ram.HostSpan(B, (int)Page).ToArray());
        Assert.Equal(Pattern(3), vm.Ram.HostSpan(C, (int)Page).ToArray());
        var st = await vm.Stats();
        Assert.Equal(new RestoreStats("eager", 3, 3, 0), st.Restore);

        byte[] b = [];
        await vm.Guest(() => b = GuestAccess.ReadPage(vm.Gva(B)));
        Assert.Equal(Pattern(2), b);
        st = await vm.Stats();
        Assert.Equal(0L, st.Paging.MissingFaults); // resident already (with paging: a MINOR fault maps it)
        if (paging) Assert.Equal(1L, st.Paging.MinorFaults);
    }

    [Fact]
    public async Task Restore_must_refuse_a_file_whose_length_is_not_the_guest_memory_size()
    {
        var path = FilePath("mem");
        await SaveBusyGuest(path, null);

        using var map = VmspaceLayout.Build(2 * OneMiB);
        var check = MemoryImage.Check(map, new MemoryRestore(path));
        Assert.NotNull(check);
        Assert.Contains($"is {OneMiB} bytes but this VM's memory is {2 * OneMiB} bytes", check);

        var events = CreateTestProbe();
        var vmspace = Sys.ActorOf(Props(map, VmspaceOptions.Paged() with { Restore = new MemoryRestore(path) }, events));
        vmspace.Tell(AwaitReady.Instance, TestActor);
        var failed = await ExpectMsgAsync<VmspaceFailed>();
        Assert.Contains("memory size (or firmware) differs", failed.Reason);
        Assert.Equal(failed.Reason, (await events.ExpectMsgAsync<VmspaceFailed>()).Reason);
        var watcher = CreateTestProbe();
        watcher.Watch(vmspace);
        Sys.Stop(vmspace);
        await watcher.ExpectTerminatedAsync(vmspace);
    }

    [Fact]
    public async Task Save_of_a_lazily_restored_vmspace_must_keep_the_pages_still_in_its_file_even_over_that_file()
    {
        var path = FilePath("mem");
        await SaveBusyGuest(path, null);

        await using (var vm = await PagedVmspace.StartAsync(this, OneMiB, restore: new MemoryRestore(path)))
        {
            await vm.Guest(() => GuestAccess.Write(vm.Gva(A + 1), [0x55]));
            var saved = await vm.Ask<MemorySaved>(new SaveMemory(1, path)); // over the file it restores from
            Assert.Null(saved.Error);
            Assert.Equal(3L, saved.Pages);
            Assert.Equal(2UL, (await vm.Stats()).Restore.PendingPages);
        }

        var bytes = File.ReadAllBytes(path);
        var a = Pattern(1);
        a[1] = 0x55;
        Assert.Equal(a, bytes[(int)A..(int)(A + Page)]);
        Assert.Equal(Pattern(2), bytes[(int)B..(int)(B + Page)]);
        Assert.Equal(Pattern(3), bytes[(int)C..(int)(C + Page)]);
        Assert.Equal([(A, Page), (B, Page), (C, Page)], Extents(path));
    }

    [Fact]
    public async Task Firmware_must_be_saved_after_RAM_and_restored_over_whatever_the_builder_loaded()
    {
        var path = FilePath("mem");
        var firmware = Enumerable.Range(0, 64 * 1024).Select(i => (byte)(i * 13 + 5)).ToArray();
        var saved = await SaveBusyGuest(path, null, firmware);
        Assert.Equal((long)(OneMiB + (ulong)firmware.Length), saved.Bytes);
        Assert.Equal(firmware, File.ReadAllBytes(path)[(int)OneMiB..]);

        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, firmware: new byte[firmware.Length], restore: new MemoryRestore(path));
        var top = await vm.Ask<MemoryData>(new ReadMemory(1, VmspaceLayout.FourGiB - (ulong)firmware.Length, firmware.Length));
        Assert.Equal(firmware, top.Data);
    }
}
