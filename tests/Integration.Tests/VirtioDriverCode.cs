using ActorVmm.Devices;
using ActorVmm.Host.Guests;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// The steps of a virtio 1.x PCI driver (virtio 1.2 §4.1, §3.1.1) as 64-bit guest code, for test guests
/// that drive a device on bus 0 as Linux's virtio-pci driver does. A failed check loads its status into
/// BL and jumps to <see cref="Fail"/>. Registers kept between steps: R15 the slot, RBP its ECAM page,
/// R14 BAR 0, R8 the common configuration, R9 the notify structure, R10 the notify-off multiplier,
/// R11 the ISR, R12 the MSI-X capability's offset, R13 the MSI-X table.
/// </summary>
internal sealed class VirtioDriverCode(Assembler a, Label fail)
{
    public Label Fail => fail;

    public void Check(byte status, Action<Label> jumpIfBad)
    {
        a.mov(bl, status);
        jumpIfBad(fail);
    }

    // CONFIG_ADDRESS for register <register> of 00:R15.0.
    private void Address(int register)
    {
        a.mov(eax, r15d);
        a.shl(eax, 11);
        a.or(eax, unchecked((int)(0x8000_0000u | (uint)register)));
        a.mov(dx, Platform.PciConfigAddressPort);
        a.@out(dx, eax);
    }

    public void ConfigRead32(int register)
    {
        Address(register);
        a.mov(dx, Platform.PciConfigDataPort);
        a.@in(eax, dx);
    }

    private void ConfigWrite32(int register, uint value)
    {
        Address(register);
        a.mov(dx, Platform.PciConfigDataPort);
        a.mov(eax, value);
        a.@out(dx, eax);
    }

    /// <summary>Scans bus 0 through mechanism #1 for vendor 0x1AF4, device 0x1040 + <paramref name="virtioId"/>
    /// (status 2 if absent); places BAR 0 at <paramref name="barBase"/>, enables memory and bus mastering;
    /// walks the capabilities through ECAM (statuses 3-11).</summary>
    public void FindAndMap(ushort virtioId, ulong barBase)
    {
        Find(virtioId);
        SizeBar();
        PlaceBar(barBase);
        WalkCapabilities(checkBar: true);
    }

    /// <summary>Scans bus 0 through mechanism #1 for vendor 0x1AF4, device 0x1040 + <paramref name="virtioId"/>
    /// (status 2 if absent): its slot in R15; <paramref name="found"/> checks it further (with R15 and the
    /// configuration accessors); then its ECAM page in RBP.</summary>
    public void Find(ushort virtioId, Action? found = null)
    {
        var scan = a.CreateLabel();
        var at = a.CreateLabel();
        a.xor(r15d, r15d);
        a.Label(ref scan);
        ConfigRead32(0x00);
        a.cmp(eax, (int)((0x1040u + virtioId) << 16 | 0x1AF4));
        a.je(at);
        a.inc(r15d);
        a.cmp(r15d, 32);
        a.jb(scan);
        Check(2, l => a.jmp(l));
        a.Label(ref at);
        found?.Invoke();
        a.mov(rbp, r15);
        a.shl(rbp, 15);
        a.mov(rax, (long)Platform.PciEcamBase);
        a.add(rbp, rax);
    }

    /// <summary>Sizes BAR 0 (registers 0x10/0x14): a 64-bit memory BAR of at least 4 KiB (statuses 3-4).</summary>
    public void SizeBar()
    {
        ConfigWrite32(0x10, 0xFFFF_FFFF);
        ConfigWrite32(0x14, 0xFFFF_FFFF);
        ConfigRead32(0x10);
        a.mov(ecx, eax);
        a.and(ecx, 0b111);
        a.cmp(ecx, 0b100);                                   // memory, 64-bit
        Check(3, l => a.jne(l));
        a.and(eax, unchecked((int)0xFFFF_FFF0));
        a.neg(eax);
        a.cmp(eax, 0x1000);
        Check(4, l => a.jb(l));
    }

    /// <summary>BAR 0 at <paramref name="barBase"/>, memory space and bus mastering on; R14 the BAR.</summary>
    public void PlaceBar(ulong barBase)
    {
        ConfigWrite32(0x10, (uint)barBase);
        ConfigWrite32(0x14, (uint)(barBase >> 32));
        ConfigWrite32(0x04, 0b110);                          // memory space + bus master
        a.mov(r14, (long)barBase);
    }

    /// <summary>The capability list through ECAM (statuses 5-11): the MSI-X capability's offset in R12 and its
    /// table in R13, the common configuration in R8, the notify structure in R9 with its multiplier in R10,
    /// the ISR in R11. <paramref name="checkBar"/>: every virtio structure must be in BAR 0 (status 7).</summary>
    public void WalkCapabilities(bool checkBar)
    {
        var walk = a.CreateLabel();
        var next = a.CreateLabel();
        var notMsix = a.CreateLabel();
        var walked = a.CreateLabel();
        a.xor(r8, r8);
        a.xor(r9, r9);
        a.xor(r11, r11);
        a.xor(r12, r12);
        a.movzx(esi, __byte_ptr[rbp + 0x34]);
        a.mov(ecx, 48);                                      // at most 48 capabilities fit in 192 bytes
        a.Label(ref walk);
        a.test(esi, esi);
        a.jz(walked);
        a.dec(ecx);
        Check(5, l => a.jz(l));                              // a loop in the list
        a.movzx(eax, __byte_ptr[rbp + rsi]);
        a.cmp(al, 0x11);
        a.jne(notMsix);
        a.mov(r12, rsi);
        a.mov(eax, __dword_ptr[rbp + rsi + 4]);
        a.test(eax, 0b111);
        Check(6, l => a.jnz(l));                             // the table is in BAR 0
        a.lea(r13, __[r14 + rax]);
        a.jmp(next);
        a.Label(ref notMsix);
        a.cmp(al, 0x09);
        a.jne(next);
        if (checkBar)
        {
            a.cmp(__byte_ptr[rbp + rsi + 4], 0);
            Check(7, l => a.jne(l));
        }
        a.mov(eax, __dword_ptr[rbp + rsi + 8]);
        a.lea(rdi, __[r14 + rax]);
        a.movzx(eax, __byte_ptr[rbp + rsi + 3]);             // cfg_type
        var notCommon = a.CreateLabel();
        var notNotify = a.CreateLabel();
        a.cmp(al, 1);
        a.jne(notCommon);
        a.mov(r8, rdi);
        a.Label(ref notCommon);
        a.cmp(al, 2);
        a.jne(notNotify);
        a.mov(r9, rdi);
        a.mov(r10d, __dword_ptr[rbp + rsi + 16]);            // notify_off_multiplier
        a.Label(ref notNotify);
        a.cmp(al, 3);
        a.cmove(r11, rdi);
        a.Label(ref next);
        a.movzx(esi, __byte_ptr[rbp + rsi + 1]);
        a.jmp(walk);
        a.Label(ref walked);
        foreach (var (reg, status) in new[] { (r8, (byte)8), (r9, (byte)9), (r11, (byte)10), (r12, (byte)11) })
        {
            a.test(reg, reg);
            Check(status, l => a.jz(l));
        }
    }

    /// <summary>MSI-X table entry n → <paramref name="vectors"/>[n] on APIC 0, unmasked; MSI-X on.</summary>
    public void EnableMsix(params byte[] vectors)
    {
        for (var i = 0; i < vectors.Length; i++)
        {
            a.mov(__dword_ptr[r13 + 16 * i], unchecked((int)0xFEE0_0000));
            a.mov(__dword_ptr[r13 + 16 * i + 4], 0);
            a.mov(__dword_ptr[r13 + 16 * i + 8], vectors[i]);
            a.mov(__dword_ptr[r13 + 16 * i + 12], 0);
        }
        a.mov(__word_ptr[rbp + r12 + 2], 0x8000);
    }

    /// <summary>Reset, ACKNOWLEDGE, DRIVER; stores the device's feature bits 0-31 at
    /// <paramref name="featuresSeen"/>; accepts those of them in <paramref name="wanted"/> and
    /// VIRTIO_F_VERSION_1; FEATURES_OK; configuration changes on MSI-X entry <paramref name="configVector"/>
    /// (statuses 13-16).</summary>
    public void Negotiate(uint wanted, ulong featuresSeen, ushort configVector)
    {
        a.mov(__byte_ptr[r8 + 0x14], 0);
        a.cmp(__byte_ptr[r8 + 0x14], 0);
        Check(13, l => a.jne(l));
        a.mov(__byte_ptr[r8 + 0x14], 1);
        a.mov(__byte_ptr[r8 + 0x14], 3);
        a.mov(__dword_ptr[r8 + 0x00], 1);
        a.test(__dword_ptr[r8 + 0x04], 1);                   // VIRTIO_F_VERSION_1 offered
        Check(14, l => a.jz(l));
        a.mov(__dword_ptr[r8 + 0x00], 0);
        a.mov(ecx, __dword_ptr[r8 + 0x04]);
        a.mov(rdi, (long)featuresSeen);
        a.mov(__dword_ptr[rdi], ecx);
        a.and(ecx, unchecked((int)wanted));
        a.mov(__dword_ptr[r8 + 0x08], 0);
        a.mov(__dword_ptr[r8 + 0x0C], ecx);
        a.mov(__dword_ptr[r8 + 0x08], 1);
        a.mov(__dword_ptr[r8 + 0x0C], 1);
        a.mov(__byte_ptr[r8 + 0x14], 0xB);
        a.test(__byte_ptr[r8 + 0x14], 0x8);
        Check(15, l => a.jz(l));
        a.mov(__word_ptr[r8 + 0x10], configVector);
        a.cmp(__word_ptr[r8 + 0x10], configVector);
        Check(16, l => a.jne(l));
    }

    /// <summary>Queue <paramref name="queue"/>: <paramref name="size"/> entries, MSI-X entry
    /// <paramref name="vector"/>, its rings at the given addresses, enabled; its notify address in
    /// <paramref name="notifyInto"/> (statuses 17-18).</summary>
    public void SetUpQueue(ushort queue, ushort size, ushort vector, ulong desc, ulong avail, ulong used, AssemblerRegister64 notifyInto)
    {
        a.mov(__word_ptr[r8 + 0x16], queue);
        a.cmp(__word_ptr[r8 + 0x18], size);
        Check(17, l => a.jb(l));
        a.mov(__word_ptr[r8 + 0x18], size);
        a.mov(__word_ptr[r8 + 0x1A], vector);
        a.cmp(__word_ptr[r8 + 0x1A], vector);
        Check(18, l => a.jne(l));
        a.mov(rax, (long)desc);
        a.mov(__qword_ptr[r8 + 0x20], rax);
        a.mov(rax, (long)avail);
        a.mov(__qword_ptr[r8 + 0x28], rax);
        a.mov(rax, (long)used);
        a.mov(__qword_ptr[r8 + 0x30], rax);
        a.movzx(eax, __word_ptr[r8 + 0x1E]);
        a.imul(eax, r10d);
        a.mov(notifyInto, r9);
        a.add(notifyInto, rax);
        a.mov(__word_ptr[r8 + 0x1C], 1);
    }

    /// <summary>DRIVER_OK (status 19).</summary>
    public void DriverOk()
    {
        a.mov(__byte_ptr[r8 + 0x14], 0xF);
        a.cmp(__byte_ptr[r8 + 0x14], 0xF);
        Check(19, l => a.jne(l));
    }

    /// <summary>Descriptor <paramref name="index"/> of the table at <paramref name="table"/>.</summary>
    public void Descriptor(ulong table, int index, ulong address, uint length, ushort flags, ushort next = 0)
    {
        a.mov(rdi, (long)(table + 16 * (ulong)index));
        a.mov(rax, (long)address);
        a.mov(__qword_ptr[rdi], rax);
        a.mov(__dword_ptr[rdi + 8], (int)length);
        a.mov(__word_ptr[rdi + 12], flags);
        a.mov(__word_ptr[rdi + 14], next);
    }

    /// <summary>Makes the chains with these heads available (after idx's previous value 0), then notifies
    /// through <paramref name="notify"/> (a register holding the queue's notify address).</summary>
    public void MakeAvailable(ulong avail, ushort queue, AssemblerRegister64 notify, ushort startIdx, params ushort[] heads)
    {
        a.mov(rdi, (long)avail);
        for (var i = 0; i < heads.Length; i++) a.mov(__word_ptr[rdi + 4 + 2 * (startIdx + i)], heads[i]);
        a.mov(__word_ptr[rdi + 2], (short)(startIdx + heads.Length)); // after the entries: x86 keeps stores in order
        a.mov(__word_ptr[notify], queue);
    }

    /// <summary>Sleeps (interrupts on only in the <c>hlt</c>) until the used ring at <paramref name="used"/>
    /// has index <paramref name="count"/> or the device sets DEVICE_NEEDS_RESET; the check is made with
    /// interrupts off, so an interrupt after it wakes the <c>hlt</c>.</summary>
    public void WaitUsed(ulong used, ushort count, Label hlt)
    {
        var wait = a.CreateLabel();
        var done = a.CreateLabel();
        a.cli();
        a.Label(ref wait);
        a.mov(rdi, (long)used);
        a.cmp(__word_ptr[rdi + 2], count);
        a.je(done);
        a.test(__byte_ptr[r8 + 0x14], 0x40);
        a.jnz(done);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.jmp(wait);
        a.Label(ref done);
    }

    /// <summary>Sleeps as <see cref="WaitUsed"/> until the dword at <paramref name="address"/> is <paramref name="value"/>.</summary>
    public void WaitDword(ulong address, int value, Label hlt)
    {
        var wait = a.CreateLabel();
        var done = a.CreateLabel();
        a.cli();
        a.Label(ref wait);
        a.mov(rdi, (long)address);
        a.cmp(__dword_ptr[rdi], value);
        a.je(done);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.jmp(wait);
        a.Label(ref done);
    }

    /// <summary>Interrupt handlers for <paramref name="vectors"/>: each stores its vector at
    /// <paramref name="vectorSeen"/> and ends with EOI; each returns past an interrupted <c>hlt</c> of
    /// <paramref name="hlts"/> (STI's shadow lost in the box).</summary>
    public static void Handlers(Assembler a, ulong vectorSeen, IReadOnlyList<(byte Vector, Label Handler)> vectors, params Label[] hlts)
    {
        foreach (var (vector, handler) in vectors)
        {
            var label = handler;
            a.Label(ref label);
            foreach (var hlt in hlts) InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            a.push(rdi);
            a.mov(rdi, (long)vectorSeen);
            a.mov(__dword_ptr[rdi], vector);
            InterruptCode.Eoi(a);
            a.pop(rdi);
            a.iretq();
        }
    }
}
