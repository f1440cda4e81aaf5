using ActorVmm.Devices;
using ActorVmm.Host.Guests;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>`actorvmm run --shm FILE,SIZE` as a user runs it: the guest and another process share the file.</summary>
public sealed partial class CliGuestTests
{
    /// <summary>A 32-bit multiboot kernel: writes "shm!" at window + 0x200, then 1 at the window's start;
    /// waits for 0x600D at + 8; prints the byte at + 0x100 on COM1; debug-exit status 1.</summary>
    private string SharedMemoryKernel()
    {
        const uint load = 0x10_0000;
        var a = new Assembler(32);
        var wait = a.CreateLabel();
        a.mov(esi, (uint)Platform.SharedMemoryBase);
        a.mov(__dword_ptr[esi + 0x200], 0x216D_6873); // "shm!"
        a.mov(__dword_ptr[esi], 1);
        a.Label(ref wait);
        a.pause();
        a.cmp(__dword_ptr[esi + 8], 0x600D);
        a.jne(wait);
        a.mov(al, __byte_ptr[esi + 0x100]);
        a.mov(dx, 0x3F8);
        a.@out(dx, al);
        a.mov(al, 0);
        a.@out(0xF4, al);
        var header = TestElf.MultibootHeader();
        var code = GuestCode.Assemble(a, load + (ulong)header.Length);
        var path = Path.Combine(_dir, "shm-kernel.elf");
        File.WriteAllBytes(path, TestElf.Build([.. header, .. code], load, load + (uint)header.Length));
        return path;
    }

    private static byte[] ReadShared(string path, long offset, int length)
    {
        using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var buffer = new byte[length];
        RandomAccess.Read(h, buffer, offset);
        return buffer;
    }

    [KvmFact]
    public async Task Run_with_shm_shares_a_file_with_the_guest_and_ctl_mem_shows_the_memory_wired()
    {
        KvmRequirement.Check();
        var shm = Path.Combine(_dir, "shared");
        var serial = Path.Combine(_dir, "serial.txt");
        var directory = Path.Combine(_dir, "control");
        var config = Path.Combine(_dir, "vm.conf");
        File.WriteAllText(config, $"actorvmm.control.directory = \"{directory}\"\nactorvmm.vm.serial.input = none\n");
        var p = Start("run", "--kernel", SharedMemoryKernel(), "--shm", shm + ",64K", "--memory", "4M", "--name", "shmvm",
            "--serial", serial, "--config", config, "--timeout", "900");

        var deadline = DateTime.UtcNow.AddSeconds(300); // a slow machine may take long to start the host process
        while (DateTime.UtcNow < deadline && !p.HasExited && !(File.Exists(shm) && ReadShared(shm, 0, 1)[0] == 1))
            await Task.Delay(50);
        if (p.HasExited) Assert.Fail($"actorvmm exited early: {await p.StandardError.ReadToEndAsync()}");
        Assert.Equal(1, ReadShared(shm, 0, 1)[0]);
        Assert.Equal("shm!"u8.ToArray(), ReadShared(shm, 0x200, 4));
        Assert.Equal(64 << 10, new FileInfo(shm).Length);

        var (ctlCode, mem, ctlErr) = await Finish(Start("ctl", "mem", "--vm", "shmvm", "--directory", directory, "--wait", "300"), TimeSpan.FromSeconds(600));
        Assert.True(ctlCode == 0, ctlErr);
        Assert.Contains("wired          4096 KiB locked in RAM", mem);
        Assert.Contains("demand paging  off", mem);

        using (var h = File.OpenHandle(shm, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
        {
            RandomAccess.Write(h, "Z"u8, 0x100);
            RandomAccess.Write(h, BitConverter.GetBytes(0x600DU), 8);
        }
        var (code, _, stderr) = await Finish(p, TimeSpan.FromSeconds(120));
        Assert.True(code == 1, $"exit {code}: {stderr}");
        Assert.Equal("Z", File.ReadAllText(serial));
    }

    [Fact]
    public async Task Run_with_shm_and_demand_paging_is_refused_with_a_clear_error()
    {
        var config = Path.Combine(_dir, "paging.conf");
        File.WriteAllText(config, "actorvmm.vm.paging.enabled = on\n");
        var (code, _, stderr) = await Finish(Start("run", "--flat", Path.Combine(_dir, "none.bin"), "--shm", Path.Combine(_dir, "s") + ",64K",
            "--config", config), TimeSpan.FromSeconds(120));
        Assert.Equal(2, code);
        Assert.Contains("shared-memory (passthru-style) device wires all guest memory", stderr);
        Assert.Contains("paging.enabled must be off", stderr);
        Assert.False(File.Exists(Path.Combine(_dir, "s")));
    }
}
