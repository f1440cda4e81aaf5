using ActorVmm.Devices;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// The shared-memory device (passthru-style: its window is host memory mapped as a memslot) with
/// real guests: guest and host see each other's writes while the VM runs, through a host file or
/// an anonymous memfd; such a VM has all guest memory wired (locked, no demand paging).
/// </summary>
public sealed class SharedMemoryGuestTests : IDisposable
{
    private const ulong Code = 0x10_0000;
    private const ulong Window = Platform.SharedMemoryBase;
    private const ulong ShmSize = 64 << 10;
    private const ulong GuestHello = 0x0, HostGo = 0x8, GuestPattern = 0x200, HostPattern = 0x100, Echo = 0x300;
    private const ulong Go = 0x600D;
    private const int PatternLength = 16;
    /// <summary>Guest RAM: wired with the window, it stays below the common 8 MiB RLIMIT_MEMLOCK, so
    /// the tests need no CAP_IPC_LOCK.</summary>
    private const ulong Ram = 4 << 20;

    private readonly string _dir = Directory.CreateTempSubdirectory("actorvmm-shm-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>
    /// Writes its pattern (0x50 + i) and then 1 ("hello"); waits until the host writes 0x600D ("go");
    /// copies the host's pattern back inverted; exits with debug-exit status 1.
    /// </summary>
    private static LongModeImage PingPongGuest()
    {
        var a = new Assembler(64);
        var fill = a.CreateLabel();
        var wait = a.CreateLabel();
        var copy = a.CreateLabel();
        a.mov(rsi, Window);
        a.xor(ecx, ecx);
        a.Label(ref fill);
        a.lea(eax, __dword_ptr[rcx + 0x50]);
        a.mov(__byte_ptr[rsi + rcx + (int)GuestPattern], al);
        a.inc(ecx);
        a.cmp(ecx, PatternLength);
        a.jne(fill);
        a.mov(__qword_ptr[rsi + (int)GuestHello], 1);
        a.Label(ref wait);
        a.pause();
        a.cmp(__qword_ptr[rsi + (int)HostGo], (int)Go);
        a.jne(wait);
        a.xor(ecx, ecx);
        a.Label(ref copy);
        a.mov(al, __byte_ptr[rsi + rcx + (int)HostPattern]);
        a.not(al);
        a.mov(__byte_ptr[rsi + rcx + (int)Echo], al);
        a.inc(ecx);
        a.cmp(ecx, PatternLength);
        a.jne(copy);
        a.mov(al, 0);
        a.@out(0xF4, al);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>How the host side reads and writes the region: through the file, or the VM's mapping.</summary>
    private interface IHostSide
    {
        byte[] Read(ulong offset, int length);
        void Write(ulong offset, byte[] data);
    }

    private sealed class FileSide(string path) : IHostSide
    {
        public byte[] Read(ulong offset, int length)
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            var buffer = new byte[length];
            Assert.Equal(length, RandomAccess.Read(h, buffer, (long)offset));
            return buffer;
        }

        public void Write(ulong offset, byte[] data)
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
            RandomAccess.Write(h, data, (long)offset);
        }
    }

    private sealed class MappingSide(SharedMemoryRegion region) : IHostSide
    {
        public byte[] Read(ulong offset, int length) => region.HostSpan(offset, length).ToArray();
        public void Write(ulong offset, byte[] data) => data.CopyTo(region.HostSpan(offset, data.Length));
    }

    private static byte[] Pattern(int start) => [.. Enumerable.Range(0, PatternLength).Select(i => (byte)(start + i))];

    [KvmTheory]
    [InlineData("file")]
    [InlineData("memfd")]
    public async Task Guest_and_host_see_each_others_writes_while_the_vm_runs(string backing)
    {
        var path = Path.Combine(_dir, "shm");
        var spec = backing == "file" ? new SharedMemorySpec(path, ShmSize) : SharedMemorySpec.Anonymous(ShmSize);
        await using var run = await GuestRun.StartAsync(new VmSpec("guest", Ram, 1, PingPongGuest()) { SharedMemory = spec });
        Assert.NotNull(run.Vm.SharedMemory);
        IHostSide host = backing == "file" ? new FileSide(path) : new MappingSide(run.Vm.SharedMemory);

        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60); // only so that a broken guest cannot hang the test
        while (BitConverter.ToUInt64(host.Read(GuestHello, 8)) != 1)
        {
            Assert.False(run.Vm.Ended.IsCompleted, "the guest ended before it said hello");
            Assert.True(DateTime.UtcNow < deadline, "the guest never said hello");
            await Task.Delay(10);
        }
        Assert.Equal(Pattern(0x50), host.Read(GuestPattern, PatternLength)); // the guest's writes reached the host

        // The VM with the device is wired: every guest page locked in RAM, no demand paging.
        var stats = await run.AskChild<VmspaceProtocol.Stats>("vmspace", VmspaceProtocol.GetStats.Instance);
        Assert.Equal(Ram, stats.WiredBytes);
        Assert.False(stats.Paging.Enabled);
        Assert.True(LockedBytes() >= Ram + ShmSize, $"VmLck is {LockedBytes()} bytes");

        host.Write(HostPattern, Pattern(0xA0));
        host.Write(HostGo, BitConverter.GetBytes(Go));
        var outcome = await run.EndAsync(TimeSpan.FromSeconds(60));
        Assert.True(outcome.ExitCode == 1, outcome.ToString());
        Assert.Equal(Pattern(0xA0).Select(b => (byte)~b), host.Read(Echo, PatternLength)); // the host's writes reached the guest
        if (backing == "file") Assert.Equal((long)ShmSize, new FileInfo(path).Length);
    }

    private static ulong LockedBytes()
    {
        var line = File.ReadLines("/proc/self/status").First(l => l.StartsWith("VmLck:", StringComparison.Ordinal));
        return ulong.Parse(line[6..].Trim().Split(' ')[0]) << 10;
    }

    private static async Task<VmBuildException> BuildFails(VmSpec spec)
    {
        var system = HostRunner.CreateSystem(VmConfig.Load(null), "test");
        try
        {
            return Assert.Throws<VmBuildException>(() => new VmBuilder(system, spec).Start());
        }
        finally
        {
            await system.Terminate();
        }
    }

    [Fact]
    public async Task Demand_paging_with_a_shared_memory_device_is_refused_before_anything_is_built()
    {
        var spec = new VmSpec("guest", Ram, 1, PingPongGuest(), Paging: VmspaceOptions.Paged()) { SharedMemory = SharedMemorySpec.Anonymous(ShmSize) };
        var e = await BuildFails(spec);
        Assert.Contains("wires all guest memory", e.Message);
        Assert.Contains("demand paging", e.Message);
    }

    [Fact]
    public async Task A_missing_shared_memory_file_without_a_size_is_reported_clearly()
    {
        var missing = Path.Combine(_dir, "nope");
        var e = await BuildFails(new VmSpec("guest", Ram, 1, PingPongGuest()) { SharedMemory = new SharedMemorySpec(missing, null) });
        Assert.Contains($"shared memory file {missing} does not exist", e.Message);
        Assert.False(File.Exists(missing));
        var dir = await BuildFails(new VmSpec("guest", Ram, 1, PingPongGuest()) { SharedMemory = new SharedMemorySpec(_dir, ShmSize) });
        Assert.Contains(_dir, dir.Message);
    }
}
