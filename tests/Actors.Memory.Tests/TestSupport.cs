using System.Runtime.InteropServices;
using Akka.Actor;
using Akka.TestKit;
using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// A host thread touching the guest view stands in for a vcpu: any access to a registered range
/// raises the same userfaultfd fault a vcpu's EPT violation would (KVM faults through it too).
/// Every touch goes through libc (memcpy), never through managed loads and stores: a thread blocked
/// in a fault inside managed code is in cooperative GC mode, so a GC would wait for it forever while
/// the actor that resolves the fault is suspended by that same GC. In a P/Invoke the thread is in
/// preemptive mode, as a vcpu thread is inside KVM_RUN.
/// </summary>
internal static unsafe class GuestAccess
{
    public const int Page = 4096;

    public static byte ReadByte(nint address)
    {
        byte b;
        TestNative.Memcpy((nint)(&b), address, 1);
        return b;
    }

    public static byte[] Read(nint address, int length)
    {
        var buffer = System.Runtime.InteropServices.NativeMemory.Alloc((nuint)length);
        try
        {
            TestNative.Memcpy((nint)buffer, address, (nuint)length);
            return new Span<byte>(buffer, length).ToArray();
        }
        finally { System.Runtime.InteropServices.NativeMemory.Free(buffer); }
    }

    public static byte[] ReadPage(nint address) => Read(address, Page);

    public static void Write(nint address, ReadOnlySpan<byte> data)
    {
        var buffer = System.Runtime.InteropServices.NativeMemory.Alloc((nuint)data.Length);
        try
        {
            data.CopyTo(new Span<byte>(buffer, data.Length));
            TestNative.Memcpy(address, (nint)buffer, (nuint)data.Length);
        }
        finally { System.Runtime.InteropServices.NativeMemory.Free(buffer); }
    }
}

internal static partial class TestNative
{
    public const int PROT_NONE = 0;
    public const int MAP_PRIVATE = 0x02, MAP_FIXED = 0x10, MAP_ANONYMOUS = 0x20;

    [LibraryImport("libc", EntryPoint = "memcpy")]
    public static partial nint Memcpy(nint destination, nint source, nuint length);

    [LibraryImport("libc", EntryPoint = "mmap", SetLastError = true)]
    public static partial nint Mmap(nint addr, nuint length, int prot, int flags, int fd, long offset);
}

/// <summary>
/// A vmspace over a real memfd-backed map (VmspaceLayout: RAM from gpa 0) with userfaultfd and a
/// swap file. Guest accesses run on dedicated threads (they block in the kernel while a fault is
/// resolved) and are awaited with timeouts. Disposal stops the vmspace first — it unregisters the
/// userfaultfd, which wakes any thread still blocked (they then fault normally, no SIGBUS) — then
/// waits for those threads, and only then unmaps the memory.
/// </summary>
internal sealed class PagedVmspace : IAsyncDisposable
{
    private readonly TestKitBase _kit;
    private readonly List<Task> _guests = [];

    public GuestMemoryMap Map { get; }
    public MemfdRegion Ram { get; }
    public IActorRef Vmspace { get; }
    public TestProbe Events { get; }
    public string SwapFile { get; }

    /// <summary>Creates the vmspace and waits until it has started (registered its userfaultfd):
    /// guest touches before that would not fault (and the vmspace would find those pages already
    /// resident — correct, but not what a test of faults wants).</summary>
    public static async Task<PagedVmspace> StartAsync(TestKitBase kit, ulong ramBytes, ulong residentLimitBytes = 0, int coldScans = 2,
        bool userfaultfd = true, Action<GuestMemoryMap>? load = null, PmapType pmapType = PmapType.Ept, TimeSpan scanInterval = default,
        bool superpages = false, DirtyTracking dirtyTracking = DirtyTracking.UffdWp, MemoryRestore? restore = null, byte[]? firmware = null)
    {
        var vm = new PagedVmspace(kit, ramBytes, residentLimitBytes, coldScans, userfaultfd, load, pmapType, scanInterval, superpages, dirtyTracking,
            restore, firmware);
        var probe = kit.CreateTestProbe();
        vm.Vmspace.Tell(VmspaceProtocol.AwaitReady.Instance, probe);
        await probe.ExpectMsgAsync<VmspaceProtocol.Ready>(TimeSpan.FromSeconds(10));
        return vm;
    }

    private PagedVmspace(TestKitBase kit, ulong ramBytes, ulong residentLimitBytes, int coldScans, bool userfaultfd,
        Action<GuestMemoryMap>? load, PmapType pmapType, TimeSpan scanInterval, bool superpages, DirtyTracking dirtyTracking,
        MemoryRestore? restore, byte[]? firmware)
    {
        _kit = kit;
        Map = VmspaceLayout.Build(ramBytes, firmware, superpages: superpages);
        Ram = Map.Segments[0].Backing;
        load?.Invoke(Map); // a loader writing through the host view before the vmspace starts
        SwapFile = Path.Combine(Path.GetTempPath(), $"actorvmm-test-swap-{Guid.NewGuid():N}");
        Events = kit.CreateTestProbe($"events-{Guid.NewGuid():N}");
        var options = new VmspaceOptions(userfaultfd, pmapType, SwapFile, residentLimitBytes, coldScans, scanInterval) { DirtyTracking = dirtyTracking, Restore = restore };
        Vmspace = kit.Sys.ActorOf(VmspaceProtocol.Props(Map, options, Events), $"vmspace-{Guid.NewGuid():N}");
    }

    /// <summary>Guest-view address of a RAM gpa (the layout puts RAM at 0 in one memfd).</summary>
    public nint Gva(ulong gpa) => Ram.GuestView + (nint)gpa;

    /// <summary>Runs guest accesses on a dedicated thread; fails the test if they take longer than the timeout.</summary>
    public Task Guest(Action body, int timeoutMs = 10_000)
    {
        var t = Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        _guests.Add(t);
        return t.WaitAsync(TimeSpan.FromMilliseconds(timeoutMs));
    }

    public async Task<T> Ask<T>(object message)
    {
        Vmspace.Tell(message, _kit.TestActor);
        return await _kit.ExpectMsgAsync<T>(TimeSpan.FromSeconds(10));
    }

    public Task<VmspaceProtocol.Stats> Stats() => Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance);

    public async ValueTask DisposeAsync()
    {
        var watcher = _kit.CreateTestProbe();
        watcher.Watch(Vmspace);
        _kit.Sys.Stop(Vmspace);
        await watcher.ExpectTerminatedAsync(Vmspace, TimeSpan.FromSeconds(10));
        try { await Task.WhenAll(_guests).WaitAsync(TimeSpan.FromSeconds(10)); }
        catch (Exception) { /* a failed guest task already failed its test */ }
        // A guest thread still inside guest memory would crash the test process on munmap: leak instead.
        if (_guests.All(t => t.IsCompleted)) Map.Dispose();
        if (File.Exists(SwapFile)) File.Delete(SwapFile);
    }
}
